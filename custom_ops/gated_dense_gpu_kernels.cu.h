// Device code of the GPU ops (the contract is gated_dense.h) and the geometry and order of their
// launches. Only CUDA built-ins are used, so that tests/cuda_shim/ can compile all of it with g++
// and run it on the CPU.
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

__global__ void ActiveFractionKernel(const unsigned long long* computed, int64_t total,
                                     float* active_fraction) {
  *active_fraction = total ? static_cast<float>(static_cast<double>(*computed) / total) : 0.f;
}

// The launches of each op, written once for gated_dense_gpu.cu.cc and for the CPU shim of the
// tests (tests/cuda_shim), so that the shim runs the geometry that ships:
// launch(kernel, geometry, args...) runs kernel<<<geometry.grid, geometry.block>>>(args...) on
// the GPU, and `computed` is zero before them.
struct Geometry {
  unsigned grid;
  unsigned block;
};

// One warp per unit.
inline Geometry GatedDenseGeometry(const GatedDenseArgs& a) {
  const int64_t warps_per_block = kGatedThreads / kWarpSize;
  return {static_cast<unsigned>((a.units + warps_per_block - 1) / warps_per_block), kGatedThreads};
}

// One thread per element, up to 4096 blocks that then stride over the rest.
inline Geometry MaskedReluGeometry(const MaskedReluArgs& a) {
  const int64_t blocks = (a.batch * a.units + kElementwiseThreads - 1) / kElementwiseThreads;
  return {static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kElementwiseThreads};
}

template <typename Launch>
void LaunchGatedDenseKernels(const GatedDenseArgs& a, unsigned long long* computed, Launch launch) {
  if (a.batch > 0 && a.units > 0) launch(GatedDenseKernel, GatedDenseGeometry(a), a, computed);
  launch(ActiveFractionKernel, Geometry{1, 1}, computed, a.batch * a.units, a.active_fraction);
}

// With a geometry of the caller's: the tests pass small grids, to run the grid-stride loop.
template <typename Launch>
void LaunchMaskedReluKernels(const MaskedReluArgs& a, unsigned long long* computed, Launch launch,
                             Geometry geometry) {
  if (a.batch > 0 && a.units > 0) launch(MaskedReluKernel, geometry, a, computed);
  launch(ActiveFractionKernel, Geometry{1, 1}, computed, a.batch * a.units, a.active_fraction);
}

template <typename Launch>
void LaunchMaskedReluKernels(const MaskedReluArgs& a, unsigned long long* computed, Launch launch) {
  LaunchMaskedReluKernels(a, computed, launch, MaskedReluGeometry(a));
}

}  // namespace gpu
}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GPU_KERNELS_CU_H_
