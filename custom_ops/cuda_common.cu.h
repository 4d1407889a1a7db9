// What the device code of the GPU ops (gated_dense_gpu_kernels.cu.h,
// gated_dense_grad_gpu_kernels.cu.h, gated_layer_gpu_kernels.cu.h) assumes of a warp, and its sum. Only CUDA built-ins are
// used, so that tests/cuda_shim/ can compile it with g++ and run it on the CPU.
#ifndef LRC_KERAS_CUSTOM_OPS_CUDA_COMMON_CU_H_
#define LRC_KERAS_CUSTOM_OPS_CUDA_COMMON_CU_H_

namespace lrc {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;  // every lane takes part in the vote or shuffle

// Butterfly reduction: the sum is complete in every lane. Lane 0 adds its partners in the order
// a shift-down reduction would, so its sum is that reduction's to the bit.
template <typename T>
__device__ __forceinline__ T WarpSum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullWarp, value, offset);
  }
  return value;
}

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_CUDA_COMMON_CU_H_
