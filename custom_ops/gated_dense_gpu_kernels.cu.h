// Device code of the GPU ops (the contract is gated_dense.h) and the geometry and order of their
// launches. Only CUDA built-ins are used, so that tests/cuda_shim/ can compile all of it with g++
// and run it on the CPU. The kernels are static: two launchers include them
// (gated_dense_gpu.cu.cc, and gated_layer_gpu.cu.cc through gated_layer_gpu_kernels.cu.h), each
// nvcc object with its own copy, which the linker would otherwise find defined twice.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GPU_KERNELS_CU_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GPU_KERNELS_CU_H_

#include "cuda_common.cu.h"
#include "gated_dense.h"

namespace lrc {
namespace gpu {

// 8 warps a block: one unit per warp.
constexpr int kGatedThreads = 256;
constexpr int kElementwiseThreads = 256;
// A warp takes a tile of rows for its unit, at most one row per lane. Tiles are as tall as the
// grid allows while it still holds kWarpsToFillGpu warps (about 64 per SM of an H100: 132 SMs),
// because the selected rows of one tile share the reads of W_j; below that, shorter tiles trade
// that sharing for warps, down to kMinRowsPerTile.
constexpr int kMaxRowsPerTile = kWarpSize;
constexpr int kMinRowsPerTile = 4;
constexpr int64_t kWarpsToFillGpu = 8192;
// Selected rows whose dot products with W_j are computed together, each W_j element read once
// for all of them; 4 accumulators a lane keep the loop in registers.
constexpr int kRowsPerPass = 4;
constexpr unsigned kMaxGridY = 65535;  // CUDA's limit on gridDim.y

// Blocks of 8 units along x, tiles of `rows_per_tile` (<= 32) rows along y: warp w of block
// (bx, by) takes unit 8·bx + w on tiles by, by + gridDim.y, ... (more tiles than CUDA allows
// along y are strided). Lane r owns row r of the tile: it alone reads the estimate of
// (row, unit) and writes y there (y may be product's own buffer), so the whole tile's
// estimates are read at once and a ballot gives the warp its selected rows. Those are then
// computed kRowsPerPass at a time: the 32 lanes stride the input dimension (coalesced reads of
// W_j and the x rows), each W_j element read once for the pass, and each sum is reduced with
// shuffles; lane r keeps the sum of its own row. Every branch is warp-uniform. A row's sum has
// the same order of additions whatever the tile or pass, so y does not depend on the geometry.
static __global__ void GatedDenseKernel(GatedDenseArgs a, int rows_per_tile, unsigned long long* computed) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) +
                       threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (unit >= a.units) return;  // uniform across the warp
  const float* w = a.kernel + unit * a.input_dim;
  const float b = a.bias[unit];
  unsigned long long count = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_tile; first < a.batch;
       first += static_cast<int64_t>(gridDim.y) * rows_per_tile) {
    const bool owner = lane < rows_per_tile && first + lane < a.batch;
    const int64_t k = (first + lane) * a.units + unit;  // used only by an owner
    const bool selected = owner && UnitIsComputed(a.product[k] + b, a.margin);
    unsigned pending = __ballot_sync(kFullWarp, selected);
    count += __popc(pending);
    float dot = 0.f;  // x_(first + lane) · W_j, once computed
    while (pending) {
      int row_lane[kRowsPerPass];  // -1: no row in this slot of the pass
      const float* row[kRowsPerPass];
      float partial[kRowsPerPass];
#pragma unroll
      for (int p = 0; p < kRowsPerPass; ++p) {
        row_lane[p] = pending ? __ffs(pending) - 1 : -1;
        pending &= pending - 1;
        row[p] = a.x + (first + (row_lane[p] < 0 ? 0 : row_lane[p])) * a.input_dim;
        partial[p] = 0.f;
      }
      for (int64_t c = lane; c < a.input_dim; c += kWarpSize) {
        const float weight = __ldg(w + c);
#pragma unroll
        for (int p = 0; p < kRowsPerPass; ++p) {
          if (row_lane[p] >= 0) partial[p] += __ldg(row[p] + c) * weight;
        }
      }
#pragma unroll
      for (int p = 0; p < kRowsPerPass; ++p) {
        if (row_lane[p] < 0) continue;
        const float sum = WarpSum(partial[p]);
        if (lane == row_lane[p]) dot = sum;
      }
    }
    if (owner) a.y[k] = MaskedRelu(dot + b, selected);
  }
  if (lane == 0 && count) atomicAdd(computed, count);
}

// Elementwise over [batch, units], grid-stride. Each element is read and written by one thread,
// so y may be z's or product's buffer.
static __global__ void MaskedReluKernel(MaskedReluArgs a, unsigned long long* computed) {
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

// Computed pairs over all pairs, 0 when there are none.
__device__ __forceinline__ float ActiveFraction(unsigned long long computed, int64_t total) {
  return total ? static_cast<float>(static_cast<double>(computed) / total) : 0.f;
}

static __global__ void ActiveFractionKernel(const unsigned long long* computed, int64_t total,
                                     float* active_fraction) {
  *active_fraction = ActiveFraction(*computed, total);
}

// The launches of each op, written once for gated_dense_gpu.cu.cc and for the CPU shim of the
// tests (tests/cuda_shim), so that the shim runs the geometry that ships:
// launch(kernel, geometry, args...) runs kernel<<<geometry.grid, geometry.block>>>(args...) on
// the GPU, and `computed` is zero before them.
struct Geometry {
  unsigned grid;
  unsigned block;
  unsigned grid_y = 1;  // blocks along y
};

struct GatedDenseLayout {
  Geometry geometry;
  int rows_per_tile;  // 1 to kMaxRowsPerTile
};

// Blocks of 8 units × tiles of rows: the tallest tiles that still give the grid
// kWarpsToFillGpu warps, so that a batch of 16 is spread over every SM and a batch of 256
// shares each read of W_j among up to 32 rows.
inline GatedDenseLayout GatedDenseGeometry(const GatedDenseArgs& a) {
  const int64_t warps_per_block = kGatedThreads / kWarpSize;
  const int64_t unit_blocks = (a.units + warps_per_block - 1) / warps_per_block;
  const auto tiles = [&](int64_t rows) { return (a.batch + rows - 1) / rows; };
  int rows = kMaxRowsPerTile;
  while (rows > kMinRowsPerTile && unit_blocks * warps_per_block * tiles(rows) < kWarpsToFillGpu) {
    rows /= 2;
  }
  const int64_t grid_y = tiles(rows) < kMaxGridY ? tiles(rows) : kMaxGridY;
  return {{static_cast<unsigned>(unit_blocks), kGatedThreads, static_cast<unsigned>(grid_y)}, rows};
}

// One thread per element, up to 4096 blocks that then stride over the rest.
inline Geometry ElementwiseGeometry(int64_t elements) {
  const int64_t blocks = (elements + kElementwiseThreads - 1) / kElementwiseThreads;
  return {static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kElementwiseThreads};
}

inline Geometry MaskedReluGeometry(const MaskedReluArgs& a) { return ElementwiseGeometry(a.batch * a.units); }

// With a layout of the caller's: the tests pass short grids and tiles, to run the strides.
template <typename Launch>
void LaunchGatedDenseKernels(const GatedDenseArgs& a, unsigned long long* computed, Launch launch,
                             GatedDenseLayout layout) {
  if (a.batch > 0 && a.units > 0) {
    launch(GatedDenseKernel, layout.geometry, a, layout.rows_per_tile, computed);
  }
  launch(ActiveFractionKernel, Geometry{1, 1}, computed, a.batch * a.units, a.active_fraction);
}

template <typename Launch>
void LaunchGatedDenseKernels(const GatedDenseArgs& a, unsigned long long* computed, Launch launch) {
  LaunchGatedDenseKernels(a, computed, launch, GatedDenseGeometry(a));
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
