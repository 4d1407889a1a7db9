// The OpKernels of LrcGatedDense and LrcMaskedRelu (registered in gated_dense_ops.cc): one
// Compute for both, which validates the inputs through the op's traits, allocates the outputs
// and hands everything to the device's functor (gated_dense.h is the contract).
#define EIGEN_USE_THREADS
#include <string>

#include "gated_dense.h"
#include "input_shapes.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

namespace {

// What differs between the ops. Each traits struct has
//   Args             the functor's arguments (gated_dense.h), with batch, units, y, active_fraction
//   Functor<Device>  the functor that fills them
//   kForwardable     the inputs whose buffer y may take over (a fresh buffer costs page faults
//                    on every call)
//   Prepare          validates the inputs, with an error that names their shapes, and fills
//                    Args but for y and active_fraction.
struct GatedDenseTraits {
  using Args = GatedDenseArgs;
  template <typename Device>
  using Functor = GatedDenseFunctor<Device>;
  // product: the functors read each element before writing it.
  static constexpr int kForwardable[] = {3};

  static absl::Status Prepare(OpKernelContext* ctx, Args* args) {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& product = ctx->input(3);
    const Tensor& margin = ctx->input(4);
    if (!(x.dims() == 2 && kernel.dims() == 2 && bias.dims() == 1 && product.dims() == 2 &&
          margin.dims() == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LrcGatedDense expects x [batch, input_dim], kernel [units, input_dim], bias [units], "
          "product [batch, units] and a scalar margin; got",
          InputShapes(ctx, {"x", "kernel", "bias", "product", "margin"})));
    }
    args->batch = x.dim_size(0);
    args->input_dim = x.dim_size(1);
    args->units = kernel.dim_size(0);
    if (!(kernel.dim_size(1) == args->input_dim && bias.dim_size(0) == args->units &&
          product.dim_size(0) == args->batch && product.dim_size(1) == args->units)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LrcGatedDense: mismatched dimensions: input_dim must agree between x[1] and kernel[1], "
          "units between kernel[0], bias[0] and product[1], batch between x[0] and product[0]; got",
          InputShapes(ctx, {"x", "kernel", "bias", "product", "margin"})));
    }
    args->x = x.flat<float>().data();
    args->kernel = kernel.flat<float>().data();
    args->bias = bias.flat<float>().data();
    args->product = product.flat<float>().data();
    args->margin = margin.scalar<float>()();  // host memory on every device
    return absl::OkStatus();
  }
};

struct MaskedReluTraits {
  using Args = MaskedReluArgs;
  template <typename Device>
  using Functor = MaskedReluFunctor<Device>;
  // z or product: elementwise.
  static constexpr int kForwardable[] = {0, 2};

  static absl::Status Prepare(OpKernelContext* ctx, Args* args) {
    const Tensor& z = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    const Tensor& product = ctx->input(2);
    const Tensor& margin = ctx->input(3);
    if (!(z.dims() == 2 && bias.dims() == 1 && product.shape() == z.shape() &&
          bias.dim_size(0) == z.dim_size(1) && margin.dims() == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LrcMaskedRelu expects z [batch, units], bias [units], product of z's shape and a "
          "scalar margin; got",
          InputShapes(ctx, {"z", "bias", "product", "margin"})));
    }
    args->batch = z.dim_size(0);
    args->units = z.dim_size(1);
    args->z = z.flat<float>().data();
    args->bias = bias.flat<float>().data();
    args->product = product.flat<float>().data();
    args->margin = margin.scalar<float>()();  // host memory on every device
    return absl::OkStatus();
  }
};

template <typename Device, typename Traits>
class GatedOpKernel : public OpKernel {
 public:
  explicit GatedOpKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    typename Traits::Args args;
    OP_REQUIRES_OK(ctx, Traits::Prepare(ctx, &args));
    Tensor* y = nullptr;
    Tensor* active_fraction = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            Traits::kForwardable, 0, TensorShape({args.batch, args.units}), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &active_fraction));
    args.y = y->flat<float>().data();
    args.active_fraction = active_fraction->flat<float>().data();
    typename Traits::template Functor<Device>()(ctx, args);
  }
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("LrcGatedDense").Device(::tensorflow::DEVICE_CPU),
                        GatedOpKernel<Eigen::ThreadPoolDevice, GatedDenseTraits>);
REGISTER_KERNEL_BUILDER(Name("LrcMaskedRelu").Device(::tensorflow::DEVICE_CPU),
                        GatedOpKernel<Eigen::ThreadPoolDevice, MaskedReluTraits>);

#if GOOGLE_CUDA
REGISTER_KERNEL_BUILDER(Name("LrcGatedDense").Device(::tensorflow::DEVICE_GPU).HostMemory("margin"),
                        GatedOpKernel<Eigen::GpuDevice, GatedDenseTraits>);
REGISTER_KERNEL_BUILDER(Name("LrcMaskedRelu").Device(::tensorflow::DEVICE_GPU).HostMemory("margin"),
                        GatedOpKernel<Eigen::GpuDevice, MaskedReluTraits>);
#endif

}  // namespace lrc
