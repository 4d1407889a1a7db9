// GPU functor of LrcGatedDenseGrad: TensorFlow's side (the op's stream, errors). Compiled by the
// host compiler with TensorFlow's headers; the kernels and their launches are in
// gated_dense_grad_gpu.cu.cc, which nvcc compiles without them.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#include "gated_dense_grad.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {

template <>
void GatedDenseGradFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                          const GatedDenseGradArgs& args) {
  const char* error = LaunchGatedDenseGrad(args, ctx->eigen_device<Eigen::GpuDevice>().stream());
  OP_REQUIRES(ctx, error == nullptr,
              absl::InternalError(
                  absl::StrCat("LrcGatedDenseGrad: CUDA kernel launch failed: ", error)));
}

}  // namespace lrc
#endif  // GOOGLE_CUDA
