// The GPU kernels of custom_ops/ compiled by g++ through cuda_shim.h, with a C API for ctypes.
// The launches are the op's own (gated_dense_gpu_kernels.cu.h): its geometry, its conditions.
#include "cuda_shim.h"
// The shim defines the CUDA built-ins the kernels use; the kernels are included unchanged.
#include "gated_dense_gpu_kernels.cu.h"

namespace {

// What kernel<<<geometry.grid, geometry.block>>>(args...) is on the GPU.
constexpr auto kOnCpu = [](auto kernel, lrc::gpu::Geometry geometry, auto... args) {
  cuda_shim::Launch(geometry.grid, geometry.block, kernel, args...);
};

}  // namespace

extern "C" {

float run_gated_dense(int64_t batch, int64_t input_dim, int64_t units, const float* x,
                      const float* kernel, const float* bias, const float* product, float margin,
                      float* y) {
  float fraction = -1.f;
  unsigned long long computed = 0;
  const lrc::GatedDenseArgs args{batch, input_dim, units, x, kernel, bias, product, margin, y, &fraction};
  lrc::gpu::LaunchGatedDenseKernels(args, &computed, kOnCpu);
  return fraction;
}

// grid 0: the op's geometry; else grid x block, to exercise the grid-stride loop.
float run_masked_relu(int64_t batch, int64_t units, const float* z, const float* bias,
                      const float* product, float margin, float* y, unsigned grid, unsigned block) {
  float fraction = -1.f;
  unsigned long long computed = 0;
  const lrc::MaskedReluArgs args{batch, units, z, product, bias, margin, y, &fraction};
  if (grid == 0) {
    lrc::gpu::LaunchMaskedReluKernels(args, &computed, kOnCpu);
  } else {
    lrc::gpu::LaunchMaskedReluKernels(args, &computed, kOnCpu, lrc::gpu::Geometry{grid, block});
  }
  return fraction;
}
}
