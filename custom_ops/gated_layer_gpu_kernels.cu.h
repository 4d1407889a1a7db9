// Device code of LrcGatedLayer (the contract is gated_layer.h) and the geometry and order of its
// launches. Only CUDA built-ins are used, so that tests/cuda_shim/ can compile all of it with g++
// and run it on the CPU. The kernels are static, as gated_dense_gpu_kernels.cu.h says why.
//
// The launches, in stream order (nothing waits on the host):
//   1. the estimate's products x·U into `projected` and (x·U)·V into y's buffer, each by
//      MultiplyKernel: 16×16 output tiles in shared memory, split along the depth into chunks
//      when the output's tiles alone would leave most SMs idle (x·U of a small batch is a few
//      tiles deep in input_dim); the chunks' partial sums are then added in chunk order by
//      SumChunksKernel, so every element has one fixed order of additions.
//   2. the sampled rows (SampledRowsKernel): skipped and the four gate counts, read from the
//      estimate before y overwrites it;
//   3. the other rows computed densely (z): LrcMaskedRelu's kernel, with y's buffer as the
//      estimate;
//   4. the rows beyond: LrcGatedDense's gated kernel, likewise;
//   5. LayerTotalsKernel: the counts (uint64, added atomically by the warps) into gate_counts
//      and active_fraction.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_LAYER_GPU_KERNELS_CU_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_LAYER_GPU_KERNELS_CU_H_

#include "gated_dense_gpu_kernels.cu.h"
#include "gated_layer.h"

namespace lrc {
namespace gpu {

// The estimate's products: tiles of kTile × kTile outputs, one a thread.
constexpr int kTile = 16;
constexpr int kMultiplyThreads = kTile * kTile;
// Below this many blocks (two an SM of an H100/H200), the depth is split into chunks.
constexpr int64_t kMultiplyBlocksToFillGpu = 264;

// c [rows, columns] = a [rows, depth] · b [depth, columns], row-major, rows lda / ldb / ldc apart.
struct MultiplyArgs {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  int64_t rows;
  int64_t depth;
  int64_t columns;
};

// Block x = column tile + column_tiles · chunk; blocks along y stride over the row tiles. With
// one chunk each block writes c; with more, chunk q writes its partial sums to
// partial_sums[q][rows][columns] and SumChunksKernel adds them into c.
struct MultiplyLayout {
  Geometry geometry;
  int64_t column_tiles;
  int64_t chunks;
  int64_t chunk_depth;  // a multiple of kTile
};

// Thread (ty, tx) of the block sums output (row tile + ty, column tile + tx) over the block's
// chunk, kTile depth steps a time from tiles of a and b in shared memory; out-of-range elements
// load as 0 (adding 0·0). Every thread reaches every __syncthreads: the loops are uniform.
static __global__ void MultiplyKernel(MultiplyArgs m, MultiplyLayout layout, float* partial_sums) {
  __shared__ float a_tile[kTile][kTile];
  __shared__ float b_tile[kTile][kTile];
  const int tx = threadIdx.x % kTile;
  const int ty = threadIdx.x / kTile;
  const int64_t chunk = blockIdx.x / layout.column_tiles;
  const int64_t column = (blockIdx.x % layout.column_tiles) * kTile + tx;
  const int64_t depth_begin = chunk * layout.chunk_depth;
  const int64_t depth_end =
      depth_begin + layout.chunk_depth < m.depth ? depth_begin + layout.chunk_depth : m.depth;
  for (int64_t first_row = static_cast<int64_t>(blockIdx.y) * kTile; first_row < m.rows;
       first_row += static_cast<int64_t>(gridDim.y) * kTile) {
    const int64_t row = first_row + ty;
    float sum = 0.f;
    for (int64_t step = depth_begin; step < depth_end; step += kTile) {
      a_tile[ty][tx] = row < m.rows && step + tx < depth_end ? __ldg(m.a + row * m.lda + step + tx) : 0.f;
      b_tile[ty][tx] = step + ty < depth_end && column < m.columns ? __ldg(m.b + (step + ty) * m.ldb + column) : 0.f;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTile; ++k) sum += a_tile[ty][k] * b_tile[k][tx];
      __syncthreads();  // the tiles are read before the next step overwrites them
    }
    if (row < m.rows && column < m.columns) {
      if (layout.chunks == 1) {
        m.c[row * m.ldc + column] = sum;
      } else {
        partial_sums[(chunk * m.rows + row) * m.columns + column] = sum;
      }
    }
  }
}

// c = Σ_q partial_sums[q], in chunk order, grid-stride over [rows, columns].
static __global__ void SumChunksKernel(MultiplyArgs m, int64_t chunks, const float* partial_sums) {
  const int64_t total = m.rows * m.columns;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t q = 0; q < chunks; ++q) sum += partial_sums[q * total + k];
    m.c[(k / m.columns) * m.ldc + k % m.columns] = sum;
  }
}

// The counters of one call, zeroed before it: computed pairs, then the gate counts (true
// positives, false positives, false negatives, true negatives of the sampled rows).
constexpr int kComputedCounter = 0;
constexpr int kGateCounters = 1;
static_assert(kGateCounters + 4 == kGatedLayerCounters, "gated_layer.h allocates the counters");

// Over the first sample_rows rows, grid-stride: skipped, and each pair's gate count (warp-summed,
// added atomically). Reads the estimate from y's buffer, which the later launches overwrite.
static __global__ void SampledRowsKernel(GatedLayerArgs a, unsigned long long* counters) {
  const int64_t total = a.sample_rows * a.units;
  unsigned long long counts[4] = {};
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float b = a.bias[k % a.units];
    const bool computes = UnitIsComputed(a.y[k] + b, a.margin);
    const float pre_activation = a.z[k] + b;
    a.skipped[k] = MaskedRelu(pre_activation, !computes);
    ++counts[(computes ? 0 : 2) + (pre_activation > 0.f ? 0 : 1)];
  }
  for (int c = 0; c < 4; ++c) {
    const unsigned long long count = WarpSum(counts[c]);  // every lane: blocks are whole warps
    if (threadIdx.x % kWarpSize == 0 && count) atomicAdd(counters + kGateCounters + c, count);
  }
}

static __global__ void LayerTotalsKernel(const unsigned long long* counters, int64_t total, float* gate_counts,
                                  float* active_fraction) {
  *active_fraction = ActiveFraction(counters[kComputedCounter], total);
  for (int c = 0; c < 4; ++c) gate_counts[c] = static_cast<float>(counters[kGateCounters + c]);
}

// Output tiles × chunks of the depth: as many chunks (of whole tiles) as it takes to give the
// grid kMultiplyBlocksToFillGpu blocks, at most one a depth tile.
inline MultiplyLayout MultiplyGeometry(int64_t rows, int64_t depth, int64_t columns) {
  const auto tiles = [](int64_t n) { return (n + kTile - 1) / kTile; };
  const int64_t column_tiles = tiles(columns);
  const int64_t row_blocks = tiles(rows) < kMaxGridY ? tiles(rows) : kMaxGridY;
  const int64_t depth_tiles = depth > 0 ? tiles(depth) : 1;
  const int64_t output_blocks = column_tiles * row_blocks > 0 ? column_tiles * row_blocks : 1;  // empty: 1
  int64_t chunks = (kMultiplyBlocksToFillGpu + output_blocks - 1) / output_blocks;
  chunks = chunks < depth_tiles ? chunks : depth_tiles;
  const int64_t tiles_per_chunk = (depth_tiles + chunks - 1) / chunks;
  chunks = (depth_tiles + tiles_per_chunk - 1) / tiles_per_chunk;  // none empty
  return {{static_cast<unsigned>(column_tiles * chunks), kMultiplyThreads, static_cast<unsigned>(row_blocks)},
          column_tiles, chunks, tiles_per_chunk * kTile};
}

// The partial sums of a product split into chunks: 0 floats when it is not. Split products have
// fewer than kMultiplyBlocksToFillGpu output tiles, so these are at most ~2·264 tiles of floats.
inline int64_t PartialSumFloats(const MultiplyArgs& m, const MultiplyLayout& layout) {
  return layout.chunks > 1 ? layout.chunks * m.rows * m.columns : 0;
}

// c = a·b with the layout given: the tests pass their own, to run the chunks and the stride
// over row tiles.
template <typename Launch>
void LaunchMultiply(const MultiplyArgs& m, const MultiplyLayout& layout, float* partial_sums, Launch launch) {
  if (m.rows == 0 || m.columns == 0) return;
  launch(MultiplyKernel, layout.geometry, m, layout, partial_sums);
  if (layout.chunks > 1) {
    launch(SumChunksKernel, ElementwiseGeometry(m.rows * m.columns), m, layout.chunks,
           static_cast<const float*>(partial_sums));
  }
}

// The estimate's two products.
inline MultiplyArgs Projection(const GatedLayerArgs& a) {
  return {a.x, a.input_dim, a.factors, a.rank, a.projected, a.rank, a.batch, a.input_dim, a.rank};
}
inline MultiplyArgs Estimate(const GatedLayerArgs& a) {
  return {a.projected, a.rank, a.factors + a.input_dim * a.rank, a.units, a.y, a.units, a.batch, a.rank, a.units};
}

// The floats of partial sums LaunchGatedLayerKernels needs (one buffer serves both products,
// one after the other).
inline int64_t GatedLayerPartialSums(const GatedLayerArgs& a) {
  const MultiplyArgs projection = Projection(a), estimate = Estimate(a);
  const int64_t first = PartialSumFloats(projection, MultiplyGeometry(a.batch, a.input_dim, a.rank));
  const int64_t second = PartialSumFloats(estimate, MultiplyGeometry(a.batch, a.rank, a.units));
  return first > second ? first : second;
}

// The launches of LrcGatedLayer, written once for gated_layer_gpu.cu.cc and for the CPU shim of
// the tests: launch(kernel, geometry, args...) runs kernel<<<dim3(geometry.grid,
// geometry.grid_y), geometry.block>>>(args...); `counters` (kGatedLayerCounters) are zero
// before them, partial_sums holds GatedLayerPartialSums(a) floats.
template <typename Launch>
void LaunchGatedLayerKernels(const GatedLayerArgs& a, unsigned long long* counters, float* partial_sums,
                             Launch launch) {
  if (a.batch > 0 && a.units > 0) {
    const MultiplyArgs projection = Projection(a), estimate = Estimate(a);
    LaunchMultiply(projection, MultiplyGeometry(a.batch, a.input_dim, a.rank), partial_sums, launch);
    LaunchMultiply(estimate, MultiplyGeometry(a.batch, a.rank, a.units), partial_sums, launch);
    if (a.sample_rows > 0) launch(SampledRowsKernel, ElementwiseGeometry(a.sample_rows * a.units), a, counters);
    unsigned long long* computed = counters + kComputedCounter;
    if (a.dense_rows > 0) {
      const MaskedReluArgs dense{a.dense_rows, a.units, a.z, a.y, a.bias, a.margin, a.y, nullptr};
      launch(MaskedReluKernel, MaskedReluGeometry(dense), dense, computed);
    }
    if (a.batch > a.dense_rows) {
      const int64_t offset = a.dense_rows * a.units;
      const GatedDenseArgs gated{a.batch - a.dense_rows, a.input_dim, a.units, a.x + a.dense_rows * a.input_dim,
                                 a.kernel, a.bias, a.y + offset, a.margin, a.y + offset, nullptr};
      const GatedDenseLayout layout = GatedDenseGeometry(gated);
      launch(GatedDenseKernel, layout.geometry, gated, layout.rows_per_tile, computed);
    }
  }
  launch(LayerTotalsKernel, Geometry{1, 1}, static_cast<const unsigned long long*>(counters), a.batch * a.units,
         a.gate_counts, a.active_fraction);
}

}  // namespace gpu
}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_LAYER_GPU_KERNELS_CU_H_
