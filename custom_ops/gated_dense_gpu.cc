// GPU functors: TensorFlow's side of the GPU ops (the op's stream, a scratch counter, errors).
// Compiled by the host compiler with TensorFlow's headers; the kernels and their launches are
// in gated_dense_gpu.cu.cc, which nvcc compiles without them.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#include "gated_dense.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

template <typename Args>
void LaunchOnOpStream(tensorflow::OpKernelContext* ctx, const Args& args,
                      const char* (*launch)(const Args&, unsigned long long*, ::CUstream_st*)) {
  tensorflow::Tensor scratch;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_UINT64, tensorflow::TensorShape({}),
                                         &scratch));
  const char* error = launch(
      args, reinterpret_cast<unsigned long long*>(scratch.flat<tensorflow::uint64>().data()),
      ctx->eigen_device<Eigen::GpuDevice>().stream());
  OP_REQUIRES(ctx, error == nullptr,
              absl::InternalError(absl::StrCat(ctx->op_kernel().type_string(),
                                               ": CUDA kernel launch failed: ", error)));
}

}  // namespace

template <>
void GatedDenseFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                      const GatedDenseArgs& args) {
  LaunchOnOpStream(ctx, args, LaunchGatedDense);
}

template <>
void MaskedReluFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                      const MaskedReluArgs& args) {
  LaunchOnOpStream(ctx, args, LaunchMaskedRelu);
}

}  // namespace lrc
#endif  // GOOGLE_CUDA
