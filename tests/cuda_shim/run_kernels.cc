// The GPU kernels of custom_ops/ compiled by g++ through cuda_shim.h, with a C API for ctypes.
// The launches are the op's own (gated_dense_gpu_kernels.cu.h): its geometry, its conditions.
#include "cuda_shim.h"
// The shim defines the CUDA built-ins the kernels use; the kernels are included unchanged.
#include "gated_dense_gpu_kernels.cu.h"

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
}
