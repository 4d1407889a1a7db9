// The GPU kernels of LrcGatedDenseGrad compiled by g++ through cuda_shim.h, with a C API for
// ctypes. The launches are the op's own (gated_dense_grad_gpu_kernels.cu.h): its geometry.
#include "cuda_shim.h"
// The shim defines the CUDA built-ins the kernels use; the kernels are included unchanged.
#include "gated_dense_grad_gpu_kernels.cu.h"

extern "C" {

void run_gated_dense_grad(int64_t batch, int64_t input_dim, int64_t units, const float* grad_y,
                          const float* y, const float* x, const float* kernel, float* grad_x,
                          float* grad_kernel, float* grad_bias) {
  // No sampled rows: the shim checks the y pairs.
  const lrc::GatedDenseGradArgs args{batch, input_dim, units,  0,           grad_y,   y, nullptr,
                                     nullptr, x,     kernel, grad_x, grad_kernel, grad_bias};
  lrc::gpu_grad::LaunchGatedDenseGradKernels(
      args, [](auto kernel, lrc::gpu_grad::Geometry geometry, auto... args) {
        cuda_shim::Launch(geometry.grid, 1, geometry.block, kernel, args...);
      });
}
}
