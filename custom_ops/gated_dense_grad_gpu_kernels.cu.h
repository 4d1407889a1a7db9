// Device code of LrcGatedDenseGrad (the contract is gated_dense_grad.h) and the geometry and
// order of its launches. Only CUDA built-ins are used, so that tests/cuda_shim/ can compile all
// of it with g++ and run it on the CPU.
//
// Two kernels, each a warp per owner and column tile, each sum in registers and stored once:
//   GradKernelKernel  warp = unit j: walks the batch 32 rows at a time; the lanes read y and
//                     grad_y of their row (a strided read, from L2 after the first tile) and
//                     vote; for each row that passes, in row order, g is broadcast and every
//                     lane adds g·x_i over its columns (coalesced reads of x_i). The first
//                     column tile's warp also sums grad_bias.
//   GradInputKernel   warp = row i: walks the units 32 at a time (coalesced reads of y and
//                     grad_y), votes, and adds g·W_j for each unit that passes, in unit order.
// A skipped pair costs its share of one vote; a passing one 32·4 columns of multiply-adds a tile.
// The grid is one-dimensional: block b is owner block b % owner_blocks, column tile
// b / owner_blocks.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GRAD_GPU_KERNELS_CU_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GRAD_GPU_KERNELS_CU_H_

#include "cuda_common.cu.h"
#include "gated_dense_grad.h"

namespace lrc {
namespace gpu_grad {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarpSize;
constexpr int kColumnsPerLane = 4;
constexpr int64_t kTileColumns = kColumnsPerLane * kWarpSize;  // columns a warp sums at once

struct Geometry {
  unsigned grid;
  unsigned block;
};

// Where a block's warps work: `owner` (a unit or a row) and the first column of their tile.
struct WarpTask {
  int64_t owner;
  int64_t column;
};

__device__ __forceinline__ WarpTask TaskOf(int64_t owner_blocks) {
  const int64_t block = blockIdx.x;
  return {(block % owner_blocks) * kWarpsPerBlock + threadIdx.x / kWarpSize,
          (block / owner_blocks) * kTileColumns};
}

// Adds g·source[c] for the lane's columns c = column + lane + 32·k of one row.
__device__ __forceinline__ void AddScaledRow(float (&sum)[kColumnsPerLane], float g,
                                             const float* source, int64_t column, int64_t input_dim,
                                             int lane) {
  for (int k = 0; k < kColumnsPerLane; ++k) {
    const int64_t c = column + lane + k * kWarpSize;
    if (c < input_dim) sum[k] += g * __ldg(source + c);
  }
}

__device__ __forceinline__ void StoreRow(const float (&sum)[kColumnsPerLane], float* target,
                                         int64_t column, int64_t input_dim, int lane) {
  for (int k = 0; k < kColumnsPerLane; ++k) {
    const int64_t c = column + lane + k * kWarpSize;
    if (c < input_dim) target[c] = sum[k];
  }
}

// One vote of a warp over a pair per lane: lane l's pair is element k of y and grad_y (or, in
// the sampled rows, of skipped and grad_skipped: PairPasses; when `valid`) and stands for row l of `rows` (x_i's or W_j's, input_dim floats apart). For each
// lane whose pair passes gradient, in lane order, its g is broadcast and every lane adds
// g·that row over its columns. Returns the lane's own g, 0 where its pair passes none.
__device__ __forceinline__ float AddPassingRows(const GatedDenseGradArgs& a, bool valid, int64_t k,
                                                const float* rows, int64_t column, int lane,
                                                float (&sum)[kColumnsPerLane]) {
  float g = 0.f;
  bool passes = false;
  if (valid) {
    const int64_t i = k / a.units, j = k % a.units;
    passes = PairPasses(a, i, j);
    if (passes) g = PairGradient(a, i, j);
  }
  for (unsigned voters = __ballot_sync(kFullWarp, passes); voters != 0; voters &= voters - 1) {
    const int source = __ffs(static_cast<int>(voters)) - 1;
    const float pair_g = __shfl_sync(kFullWarp, g, source);
    AddScaledRow(sum, pair_g, rows + source * a.input_dim, column, a.input_dim, lane);
  }
  return g;
}

// dW_j and (first tile) db_j for the warp's unit j.
__global__ void GradKernelKernel(GatedDenseGradArgs a, int64_t unit_blocks) {
  const WarpTask task = TaskOf(unit_blocks);
  const int lane = threadIdx.x % kWarpSize;
  if (task.owner >= a.units) return;  // uniform across the warp
  const int64_t j = task.owner;
  float sum[kColumnsPerLane] = {};
  float bias_sum = 0.f;  // lane's rows, added in row order
  for (int64_t first = 0; first < a.batch; first += kWarpSize) {
    const int64_t i = first + lane;
    bias_sum += AddPassingRows(a, i < a.batch, i * a.units + j, a.x + first * a.input_dim, task.column,
                               lane, sum);
  }
  StoreRow(sum, a.grad_kernel + j * a.input_dim, task.column, a.input_dim, lane);
  if (task.column == 0) {
    bias_sum = WarpSum(bias_sum);
    if (lane == 0) a.grad_bias[j] = bias_sum;
  }
}

// dx_i for the warp's row i.
__global__ void GradInputKernel(GatedDenseGradArgs a, int64_t row_blocks) {
  const WarpTask task = TaskOf(row_blocks);
  const int lane = threadIdx.x % kWarpSize;
  if (task.owner >= a.batch) return;  // uniform across the warp
  const int64_t i = task.owner;
  float sum[kColumnsPerLane] = {};
  for (int64_t first = 0; first < a.units; first += kWarpSize) {
    const int64_t j = first + lane;
    AddPassingRows(a, j < a.units, i * a.units + j, a.kernel + first * a.input_dim, task.column, lane,
                   sum);
  }
  StoreRow(sum, a.grad_x + i * a.input_dim, task.column, a.input_dim, lane);
}

// Owner blocks × column tiles; the kernel gradient's grid has at least one tile, so that
// grad_bias is written when input_dim is 0.
inline int64_t OwnerBlocks(int64_t owners) { return (owners + kWarpsPerBlock - 1) / kWarpsPerBlock; }
inline int64_t Tiles(int64_t input_dim) { return (input_dim + kTileColumns - 1) / kTileColumns; }

// The launches, written once for gated_dense_grad_gpu.cu.cc and for the CPU shim of the tests:
// launch(kernel, geometry, args...) runs kernel<<<geometry.grid, geometry.block>>>(args...).
template <typename Launch>
void LaunchGatedDenseGradKernels(const GatedDenseGradArgs& a, Launch launch) {
  const int64_t unit_blocks = OwnerBlocks(a.units);
  const int64_t row_blocks = OwnerBlocks(a.batch);
  const int64_t tiles = Tiles(a.input_dim);
  if (a.units > 0) {
    const int64_t kernel_tiles = tiles > 0 ? tiles : 1;
    const Geometry geometry{static_cast<unsigned>(unit_blocks * kernel_tiles), kThreads};
    launch(GradKernelKernel, geometry, a, unit_blocks);
  }
  if (a.batch > 0 && tiles > 0) {
    const Geometry geometry{static_cast<unsigned>(row_blocks * tiles), kThreads};
    launch(GradInputKernel, geometry, a, row_blocks);
  }
}

}  // namespace gpu_grad
}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GRAD_GPU_KERNELS_CU_H_
