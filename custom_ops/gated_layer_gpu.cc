// GPU functor of LrcGatedLayer: TensorFlow's side (the op's stream, the counters and partial
// sums as temporaries, errors). Compiled by the host compiler with TensorFlow's headers; the
// kernels and their launches are in gated_layer_gpu.cu.cc, which nvcc compiles without them.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#include "gated_layer.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {

template <>
void GatedLayerFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                      const GatedLayerArgs& args) {
  tensorflow::Tensor counters;
  tensorflow::Tensor partial_sums;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_UINT64,
                                         tensorflow::TensorShape({kGatedLayerCounters}), &counters));
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                         tensorflow::TensorShape({GatedLayerPartialSumFloats(args)}),
                                         &partial_sums));
  const char* error = LaunchGatedLayer(
      args, reinterpret_cast<unsigned long long*>(counters.flat<tensorflow::uint64>().data()),
      partial_sums.flat<float>().data(), ctx->eigen_device<Eigen::GpuDevice>().stream());
  OP_REQUIRES(ctx, error == nullptr,
              absl::InternalError(absl::StrCat("LrcGatedLayer: CUDA kernel launch failed: ", error)));
}

}  // namespace lrc
#endif  // GOOGLE_CUDA
