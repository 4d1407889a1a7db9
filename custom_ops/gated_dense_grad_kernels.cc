// The OpKernel of LrcGatedDenseGrad (registered in gated_dense_grad_ops.cc): validates the inputs,
// allocates the three gradients and hands everything to the device's functor
// (gated_dense_grad.h is the contract).
#define EIGEN_USE_THREADS
#include <limits>
#include <string>

#include "gated_dense_grad.h"
#include "input_shapes.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// The op's inputs, in order.
constexpr std::initializer_list<const char*> kInputs = {"grad_y", "y", "grad_skipped", "skipped", "x", "kernel"};

absl::Status Prepare(OpKernelContext* ctx, GatedDenseGradArgs* args) {
  const Tensor& grad_y = ctx->input(0);
  const Tensor& y = ctx->input(1);
  const Tensor& grad_skipped = ctx->input(2);
  const Tensor& skipped = ctx->input(3);
  const Tensor& x = ctx->input(4);
  const Tensor& kernel = ctx->input(5);
  if (!(grad_y.dims() == 2 && y.shape() == grad_y.shape() && skipped.dims() == 2 &&
        grad_skipped.shape() == skipped.shape() && x.dims() == 2 && kernel.dims() == 2 &&
        x.dim_size(0) == y.dim_size(0) && kernel.dim_size(0) == y.dim_size(1) &&
        skipped.dim_size(0) <= y.dim_size(0) && skipped.dim_size(1) == y.dim_size(1) &&
        kernel.dim_size(1) == x.dim_size(1))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LrcGatedDenseGrad expects grad_y and y [batch, units], grad_skipped and skipped "
        "[sample_rows <= batch, units], x [batch, input_dim] and kernel [units, input_dim]; got",
        InputShapes(ctx, kInputs)));
  }
  // The CPU kernel lists pairs by 32-bit row and unit indices.
  constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();
  if (y.dim_size(0) > kMaxIndex || y.dim_size(1) > kMaxIndex) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LrcGatedDenseGrad supports up to ", kMaxIndex, " rows and units; got", InputShapes(ctx, kInputs)));
  }
  args->batch = x.dim_size(0);
  args->input_dim = x.dim_size(1);
  args->units = kernel.dim_size(0);
  args->sample_rows = skipped.dim_size(0);
  args->grad_y = grad_y.flat<float>().data();
  args->y = y.flat<float>().data();
  args->grad_skipped = grad_skipped.flat<float>().data();
  args->skipped = skipped.flat<float>().data();
  args->x = x.flat<float>().data();
  args->kernel = kernel.flat<float>().data();
  return absl::OkStatus();
}

template <typename Device>
class GatedDenseGradOpKernel : public OpKernel {
 public:
  explicit GatedDenseGradOpKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    GatedDenseGradArgs args;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &args));
    Tensor* grad_x = nullptr;
    Tensor* grad_kernel = nullptr;
    Tensor* grad_bias = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({args.batch, args.input_dim}), &grad_x));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(1, TensorShape({args.units, args.input_dim}), &grad_kernel));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({args.units}), &grad_bias));
    args.grad_x = grad_x->flat<float>().data();
    args.grad_kernel = grad_kernel->flat<float>().data();
    args.grad_bias = grad_bias->flat<float>().data();
    GatedDenseGradFunctor<Device>()(ctx, args);
  }
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("LrcGatedDenseGrad").Device(::tensorflow::DEVICE_CPU),
                        GatedDenseGradOpKernel<Eigen::ThreadPoolDevice>);
#if GOOGLE_CUDA
REGISTER_KERNEL_BUILDER(Name("LrcGatedDenseGrad").Device(::tensorflow::DEVICE_GPU),
                        GatedDenseGradOpKernel<Eigen::GpuDevice>);
#endif

}  // namespace lrc
