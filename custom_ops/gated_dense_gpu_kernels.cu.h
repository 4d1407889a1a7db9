// Device code of the GPU ops (the contract is gated_dense.h). Only CUDA built-ins are used, so
// that tests/cuda_shim/ can compile these kernels with g++ and run them on the CPU.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GPU_KERNELS_CU_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GPU_KERNELS_CU_H_

#include "gated_dense.h"

namespace lrc {
namespace gpu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
// 8 warps a block: one unit per warp.
constexpr int kGatedThreads = 256;
constexpr int kElementwiseThreads = 256;

template <typename T>
__device__ __forceinline__ T WarpSum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(kFullWarp, value, offset);
  }
  return value;  // complete in lane 0
}

// One warp per unit j. The warp walks the batch; lane 0 reads the estimate and broadcasts it
// (y may be product's own buffer, so only the lane that writes y[i, j] reads product[i, j]).
// For a selected row the 32 lanes stride the input dimension, so that reads of x_i and W_j
// are coalesced, and reduce with shuffles. The branch is warp-uniform: no divergence.
__global__ void GatedDenseKernel(GatedDenseArgs a, unsigned long long* computed) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) +
                       threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (unit >= a.units) return;  // uniform across the warp
  const float* w = a.kernel + unit * a.input_dim;
  const float b = a.bias[unit];
  unsigned long long count = 0;
  for (int64_t i = 0; i < a.batch; ++i) {
    const int64_t k = i * a.units + unit;
    float estimate = 0.f;
    if (lane == 0) estimate = a.product[k] + b;
    estimate = __shfl_sync(kFullWarp, estimate, 0);
    if (!UnitIsComputed(estimate, a.margin)) {
      if (lane == 0) a.y[k] = 0.f;
      continue;
    }
    const float* x = a.x + i * a.input_dim;
    float partial = 0.f;
    for (int64_t c = lane; c < a.input_dim; c += kWarpSize) partial += __ldg(x + c) * __ldg(w + c);
    const float dot = WarpSum(partial);
    if (lane == 0) a.y[k] = MaskedRelu(dot + b, true);
    ++count;
  }
  if (lane == 0 && count) atomicAdd(computed, count);
}

// Elementwise over [batch, units], grid-stride. Each element is read and written by one thread,
// so y may be z's or product's buffer.
__global__ void MaskedReluKernel(MaskedReluArgs a, unsigned long long* computed) {
  const int64_t total = a.batch * a.units;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long count = 0;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += stride) {
    const float b = a.bias[k % a.units];
    const bool selected = UnitIsComputed(a.product[k] + b, a.margin);
    a.y[k] = MaskedRelu(a.z[k] + b, selected);
    count += selected;
  }
  count = WarpSum(count);  // every lane reaches here: blocks are whole warps
  if (threadIdx.x % kWarpSize == 0 && count) atomicAdd(computed, count);
}

// Launch geometry, shared by gated_dense_gpu.cu.cc and the CPU shim of the tests.
inline unsigned GatedDenseBlocks(int64_t units) {
  const int64_t warps_per_block = kGatedThreads / kWarpSize;
  return static_cast<unsigned>((units + warps_per_block - 1) / warps_per_block);
}

inline unsigned ElementwiseBlocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

__global__ void ActiveFractionKernel(const unsigned long long* computed, int64_t total,
                                     float* active_fraction) {
  *active_fraction = total ? static_cast<float>(static_cast<double>(*computed) / total) : 0.f;
}

}  // namespace gpu
}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GPU_KERNELS_CU_H_
