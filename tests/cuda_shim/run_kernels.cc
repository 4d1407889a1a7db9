// The GPU kernels of custom_ops/ compiled by g++ through cuda_shim.h, with a C API for ctypes.
// The launches are the ops' own (gated_dense_gpu_kernels.cu.h, gated_layer_gpu_kernels.cu.h):
// their geometry, their conditions.
#include "cuda_shim.h"
// The shim defines the CUDA built-ins the kernels use; the kernels are included unchanged.
#include <vector>

#include "gated_dense_gpu_kernels.cu.h"
#include "gated_layer_gpu_kernels.cu.h"

extern "C" {

// grid 0: the op's layout; else grid x grid_y blocks on tiles of rows_per_tile rows, to
// exercise the tiles and the stride over them.
float run_gated_dense(int64_t batch, int64_t input_dim, int64_t units, const float* x,
                      const float* kernel, const float* bias, const float* product, float margin,
                      float* y, unsigned grid, unsigned grid_y, int rows_per_tile) {
  float fraction = -1.f;
  unsigned long long computed = 0;
  const lrc::GatedDenseArgs args{batch, input_dim, units, x, kernel, bias, product, margin, y, &fraction};
  if (grid == 0) {
    lrc::gpu::LaunchGatedDenseKernels(args, &computed, cuda_shim::kLaunchOnCpu);
  } else {
    const lrc::gpu::GatedDenseLayout layout{{grid, lrc::gpu::kGatedThreads, grid_y}, rows_per_tile};
    lrc::gpu::LaunchGatedDenseKernels(args, &computed, cuda_shim::kLaunchOnCpu, layout);
  }
  return fraction;
}

// grid 0: the op's geometry; else grid x block, to exercise the grid-stride loop.
float run_masked_relu(int64_t batch, int64_t units, const float* z, const float* bias,
                      const float* product, float margin, float* y, unsigned grid, unsigned block) {
  float fraction = -1.f;
  unsigned long long computed = 0;
  const lrc::MaskedReluArgs args{batch, units, z, product, bias, margin, y, &fraction};
  if (grid == 0) {
    lrc::gpu::LaunchMaskedReluKernels(args, &computed, cuda_shim::kLaunchOnCpu);
  } else {
    lrc::gpu::LaunchMaskedReluKernels(args, &computed, cuda_shim::kLaunchOnCpu, lrc::gpu::Geometry{grid, block});
  }
  return fraction;
}

// LrcGatedLayer's launches as gated_layer_gpu.cu.cc makes them, its counters zeroed and its
// scratch (projected, the partial sums) allocated here.
void run_gated_layer(int64_t batch, int64_t input_dim, int64_t units, int64_t rank, int64_t dense_rows,
                     int64_t sample_rows, const float* x, const float* factors, const float* kernel,
                     const float* bias, float margin, const float* z, float* y, float* skipped,
                     float* gate_counts, float* active_fraction) {
  std::vector<float> projected(batch * rank);
  unsigned long long counters[lrc::kGatedLayerCounters] = {};
  lrc::GatedLayerArgs args{batch, input_dim, units, rank, dense_rows, sample_rows, x, factors, kernel, bias,
                           margin, z, projected.data(), y, skipped, gate_counts, active_fraction};
  std::vector<float> partial_sums(lrc::gpu::GatedLayerPartialSums(args));
  lrc::gpu::LaunchGatedLayerKernels(args, counters, partial_sums.data(), cuda_shim::kLaunchOnCpu);
}

// c = a·b by the estimate's multiply: chunks 0 takes the op's layout; else `chunks` chunks of
// chunk_depth (a multiple of 16) and grid_y blocks along y. Returns the chunks it ran.
int64_t run_multiply(int64_t rows, int64_t depth, int64_t columns, const float* a, const float* b, float* c,
                     int64_t chunks, int64_t chunk_depth, unsigned grid_y) {
  const lrc::gpu::MultiplyArgs m{a, depth, b, columns, c, columns, rows, depth, columns};
  lrc::gpu::MultiplyLayout layout = lrc::gpu::MultiplyGeometry(rows, depth, columns);
  if (chunks > 0) {
    layout.chunks = chunks;
    layout.chunk_depth = chunk_depth;
    layout.geometry.grid = static_cast<unsigned>(layout.column_tiles * chunks);
    layout.geometry.grid_y = grid_y;
  }
  std::vector<float> partial_sums(lrc::gpu::PartialSumFloats(m, layout));
  lrc::gpu::LaunchMultiply(m, layout, partial_sums.data(), cuda_shim::kLaunchOnCpu);
  return layout.chunks;
}

// The chunks of the depth the op's layout splits c = a·b into.
int64_t multiply_chunks(int64_t rows, int64_t depth, int64_t columns) {
  return lrc::gpu::MultiplyGeometry(rows, depth, columns).chunks;
}
}
