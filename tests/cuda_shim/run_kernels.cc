// The GPU kernels of custom_ops/ compiled by g++ through cuda_shim.h, with a C API for ctypes.
#include "cuda_shim.h"
// The shim defines the CUDA built-ins the kernels use; the kernels are included unchanged.
#include "gated_dense_gpu_kernels.cu.h"

extern "C" {

// LrcGatedDense's GPU kernels, launched with the geometry gated_dense_gpu.cu.cc uses.
float run_gated_dense(int64_t batch, int64_t input_dim, int64_t units, const float* x,
                      const float* kernel, const float* bias, const float* product, float margin,
                      float* y) {
  float fraction = -1.f;
  unsigned long long computed = 0;
  const lrc::GatedDenseArgs args{batch, input_dim, units, x, kernel, bias, product, margin, y, &fraction};
  if (batch > 0 && units > 0) {
    cuda_shim::Launch(lrc::gpu::GatedDenseBlocks(units), lrc::gpu::kGatedThreads,
                      lrc::gpu::GatedDenseKernel, args, &computed);
  }
  cuda_shim::Launch(1, 1, lrc::gpu::ActiveFractionKernel, static_cast<const unsigned long long*>(&computed),
                    batch * units, &fraction);
  return fraction;
}

// LrcMaskedRelu's kernel; grid and block are the caller's, to exercise the grid-stride loop.
float run_masked_relu(int64_t batch, int64_t units, const float* z, const float* bias,
                      const float* product, float margin, float* y, unsigned grid, unsigned block) {
  float fraction = -1.f;
  unsigned long long computed = 0;
  const lrc::MaskedReluArgs args{batch, units, z, product, bias, margin, y, &fraction};
  cuda_shim::Launch(grid, block, lrc::gpu::MaskedReluKernel, args, &computed);
  cuda_shim::Launch(1, 1, lrc::gpu::ActiveFractionKernel, static_cast<const unsigned long long*>(&computed),
                    batch * units, &fraction);
  return fraction;
}

unsigned elementwise_blocks(int64_t total) { return lrc::gpu::ElementwiseBlocks(total); }
}
