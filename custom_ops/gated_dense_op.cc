// LrcGatedDense and LrcMaskedRelu: op registration, shape functions, and the OpKernels that
// validate their inputs and hand them to the device's functors (gated_dense.h is the contract).
#define EIGEN_USE_THREADS
#include "gated_dense.h"

#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace lrc {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Both ops end with a bias [units], a [batch, units] estimate product and a scalar margin,
// and return y [batch, units] and a scalar.
absl::Status GatedOutputShapes(InferenceContext* c, DimensionHandle batch, DimensionHandle units,
                               int bias_index) {
  ShapeHandle bias, product, margin;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_index), 1, &bias));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_index + 1), 2, &product));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_index + 2), 0, &margin));
  TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(bias, 0), &units));
  TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(product, 1), &units));
  TF_RETURN_IF_ERROR(c->Merge(batch, c->Dim(product, 0), &batch));
  c->set_output(0, c->Matrix(batch, units));
  c->set_output(1, c->Scalar());
  return absl::OkStatus();
}

std::string Shapes(OpKernelContext* ctx, std::initializer_list<const char*> names) {
  std::string text = " (";
  int index = 0;
  for (const char* name : names) {
    absl::StrAppend(&text, index ? ", " : "", name, " ", ctx->input(index).shape().DebugString());
    ++index;
  }
  return text + ")";
}

// y of `shape`, in the buffer of one of the `forwardable` inputs when TF can hand it over (a
// fresh buffer costs page faults on every call), and the scalar active fraction.
absl::Status AllocateOutputs(OpKernelContext* ctx, std::initializer_list<int> forwardable,
                             const TensorShape& shape, float** y, float** active_fraction) {
  Tensor* y_tensor = nullptr;
  Tensor* fraction_tensor = nullptr;
  TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output(forwardable, 0, shape, &y_tensor));
  TF_RETURN_IF_ERROR(ctx->allocate_output(1, TensorShape({}), &fraction_tensor));
  *y = y_tensor->flat<float>().data();
  *active_fraction = fraction_tensor->flat<float>().data();
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("LrcGatedDense")
    .Input("x: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Input("product: float")
    .Input("margin: float")
    .Output("y: float")
    .Output("active_fraction: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &kernel));
      DimensionHandle input_dim;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(kernel, 1), &input_dim));
      return GatedOutputShapes(c, c->Dim(x, 0), c->Dim(kernel, 0), 2);
    });

REGISTER_OP("LrcMaskedRelu")
    .Input("z: float")
    .Input("bias: float")
    .Input("product: float")
    .Input("margin: float")
    .Output("y: float")
    .Output("active_fraction: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle z;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &z));
      return GatedOutputShapes(c, c->Dim(z, 0), c->Dim(z, 1), 1);
    });

template <typename Device>
class GatedDenseOp : public OpKernel {
 public:
  explicit GatedDenseOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& product = ctx->input(3);
    const Tensor& margin = ctx->input(4);
    OP_REQUIRES(ctx,
                x.dims() == 2 && kernel.dims() == 2 && bias.dims() == 1 && product.dims() == 2 &&
                    margin.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "LrcGatedDense expects x [batch, input_dim], kernel [units, input_dim], "
                    "bias [units], product [batch, units] and a scalar margin; got",
                    Shapes(ctx, {"x", "kernel", "bias", "product", "margin"}))));
    GatedDenseArgs args;
    args.batch = x.dim_size(0);
    args.input_dim = x.dim_size(1);
    args.units = kernel.dim_size(0);
    OP_REQUIRES(ctx,
                kernel.dim_size(1) == args.input_dim && bias.dim_size(0) == args.units &&
                    product.dim_size(0) == args.batch && product.dim_size(1) == args.units,
                absl::InvalidArgumentError(absl::StrCat(
                    "LrcGatedDense: mismatched dimensions: input_dim must agree between x[1] and "
                    "kernel[1], units between kernel[0], bias[0] and product[1], batch between "
                    "x[0] and product[0]; got",
                    Shapes(ctx, {"x", "kernel", "bias", "product", "margin"}))));
    // y may take over product's buffer: the functors read each element before writing it.
    OP_REQUIRES_OK(ctx, AllocateOutputs(ctx, {3}, TensorShape({args.batch, args.units}), &args.y,
                                        &args.active_fraction));
    args.x = x.flat<float>().data();
    args.kernel = kernel.flat<float>().data();
    args.bias = bias.flat<float>().data();
    args.product = product.flat<float>().data();
    args.margin = margin.scalar<float>()();  // host memory on every device
    GatedDenseFunctor<Device>()(ctx, args);
  }
};

template <typename Device>
class MaskedReluOp : public OpKernel {
 public:
  explicit MaskedReluOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& z = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    const Tensor& product = ctx->input(2);
    const Tensor& margin = ctx->input(3);
    OP_REQUIRES(ctx,
                z.dims() == 2 && bias.dims() == 1 && product.shape() == z.shape() &&
                    bias.dim_size(0) == z.dim_size(1) && margin.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "LrcMaskedRelu expects z [batch, units], bias [units], product of z's "
                    "shape and a scalar margin; got",
                    Shapes(ctx, {"z", "bias", "product", "margin"}))));
    MaskedReluArgs args;
    args.batch = z.dim_size(0);
    args.units = z.dim_size(1);
    // Elementwise: y may take over z's or product's buffer.
    OP_REQUIRES_OK(ctx, AllocateOutputs(ctx, {0, 2}, z.shape(), &args.y, &args.active_fraction));
    args.z = z.flat<float>().data();
    args.bias = bias.flat<float>().data();
    args.product = product.flat<float>().data();
    args.margin = margin.scalar<float>()();
    MaskedReluFunctor<Device>()(ctx, args);
  }
};

REGISTER_KERNEL_BUILDER(Name("LrcGatedDense").Device(::tensorflow::DEVICE_CPU),
                        GatedDenseOp<Eigen::ThreadPoolDevice>);
REGISTER_KERNEL_BUILDER(Name("LrcMaskedRelu").Device(::tensorflow::DEVICE_CPU),
                        MaskedReluOp<Eigen::ThreadPoolDevice>);

#if GOOGLE_CUDA
REGISTER_KERNEL_BUILDER(
    Name("LrcGatedDense").Device(::tensorflow::DEVICE_GPU).HostMemory("margin"),
    GatedDenseOp<Eigen::GpuDevice>);
REGISTER_KERNEL_BUILDER(
    Name("LrcMaskedRelu").Device(::tensorflow::DEVICE_GPU).HostMemory("margin"),
    MaskedReluOp<Eigen::GpuDevice>);
#endif

}  // namespace lrc
