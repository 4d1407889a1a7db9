// LrcGatedDense: op registration, shape function, and the OpKernel that validates its inputs
// and hands them to the device's GatedDenseFunctor (see gated_dense.h for the contract).
#define EIGEN_USE_THREADS
#include "gated_dense.h"

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

REGISTER_OP("LrcGatedDense")
    .Input("x: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Input("z_hat: float")
    .Input("margin: float")
    .Output("y: float")
    .Output("active_fraction: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, kernel, bias, z_hat, margin;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &kernel));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &bias));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &z_hat));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &margin));
      DimensionHandle input_dim, units, batch;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(kernel, 1), &input_dim));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, 0), c->Dim(bias, 0), &units));
      TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(z_hat, 1), &units));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(z_hat, 0), &batch));
      c->set_output(0, c->Matrix(batch, units));
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    });

namespace {

std::string ShapeString(const Tensor& t) { return t.shape().DebugString(); }

}  // namespace

template <typename Device>
class GatedDenseOp : public OpKernel {
 public:
  explicit GatedDenseOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& z_hat = ctx->input(3);
    const Tensor& margin = ctx->input(4);
    const std::string shapes = absl::StrCat(
        " (x ", ShapeString(x), ", kernel ", ShapeString(kernel), ", bias ", ShapeString(bias),
        ", z_hat ", ShapeString(z_hat), ", margin ", ShapeString(margin), ")");
    OP_REQUIRES(ctx,
                x.dims() == 2 && kernel.dims() == 2 && bias.dims() == 1 && z_hat.dims() == 2 &&
                    margin.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "LrcGatedDense expects x [batch, input_dim], kernel [units, input_dim], "
                    "bias [units], z_hat [batch, units] and a scalar margin; got",
                    shapes)));
    GatedDenseArgs args;
    args.batch = x.dim_size(0);
    args.input_dim = x.dim_size(1);
    args.units = kernel.dim_size(0);
    OP_REQUIRES(ctx,
                kernel.dim_size(1) == args.input_dim && bias.dim_size(0) == args.units &&
                    z_hat.dim_size(0) == args.batch && z_hat.dim_size(1) == args.units,
                absl::InvalidArgumentError(absl::StrCat(
                    "LrcGatedDense: mismatched dimensions: input_dim must agree between x[1] and "
                    "kernel[1], units between kernel[0], bias[0] and z_hat[1], batch between "
                    "x[0] and z_hat[0]; got",
                    shapes)));
    Tensor* y = nullptr;
    Tensor* active_fraction = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({args.batch, args.units}), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &active_fraction));
    args.x = x.flat<float>().data();
    args.kernel = kernel.flat<float>().data();
    args.bias = bias.flat<float>().data();
    args.z_hat = z_hat.flat<float>().data();
    // The margin is a host scalar on every device (HostMemory below).
    args.margin = margin.scalar<float>()();
    args.y = y->flat<float>().data();
    args.active_fraction = active_fraction->flat<float>().data();
    GatedDenseFunctor<Device>()(ctx, args);
  }
};

REGISTER_KERNEL_BUILDER(Name("LrcGatedDense").Device(::tensorflow::DEVICE_CPU),
                        GatedDenseOp<Eigen::ThreadPoolDevice>);

#if GOOGLE_CUDA
REGISTER_KERNEL_BUILDER(
    Name("LrcGatedDense").Device(::tensorflow::DEVICE_GPU).HostMemory("margin"),
    GatedDenseOp<Eigen::GpuDevice>);
#endif

}  // namespace lrc
