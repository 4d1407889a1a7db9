// The C API that gpu_check.py loads with ctypes: the op's own launches of
// custom_ops/gated_dense_gpu_kernels.cu.h, without TensorFlow. gpu_check.py builds it either
//   with nvcc, together with custom_ops/gated_dense_gpu.cu.cc (LaunchGatedDense and
//     LaunchMaskedRelu, exactly as the op calls them): pointers are device pointers and
//     `stream` a cudaStream_t; or
//   with g++ on the CPU shim of the tests (tests/cuda_shim): pointers are host pointers, the
//     kernels run on the CPU before the call returns, and `stream` is ignored.
// Each function returns nullptr or an error message.
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include "gated_dense.h"
#else
#include "cuda_shim.h"
#include "gated_dense_gpu_kernels.cu.h"
#endif

namespace {

#if defined(__CUDACC__)
const char* LaunchGatedDense(const lrc::GatedDenseArgs& args, unsigned long long* scratch, void* stream) {
  return lrc::LaunchGatedDense(args, scratch, static_cast<cudaStream_t>(stream));
}

const char* LaunchMaskedRelu(const lrc::MaskedReluArgs& args, unsigned long long* scratch, void* stream) {
  return lrc::LaunchMaskedRelu(args, scratch, static_cast<cudaStream_t>(stream));
}

// Busy for `nanoseconds` of the GPU's clock: launches queued behind it start back to back, so
// that CUDA events around them time the GPU and not the host's launch latency.
__global__ void SpinKernel(int64_t nanoseconds) {
  uint64_t start;
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < static_cast<uint64_t>(nanoseconds));
}
#else
// What LaunchOnStream (gated_dense_gpu.cu.cc) does on the GPU: zero the count, then launch.
const char* LaunchGatedDense(const lrc::GatedDenseArgs& args, unsigned long long* scratch, void*) {
  *scratch = 0;
  lrc::gpu::LaunchGatedDenseKernels(args, scratch, cuda_shim::kLaunchOnCpu);
  return nullptr;
}

const char* LaunchMaskedRelu(const lrc::MaskedReluArgs& args, unsigned long long* scratch, void*) {
  *scratch = 0;
  lrc::gpu::LaunchMaskedReluKernels(args, scratch, cuda_shim::kLaunchOnCpu);
  return nullptr;
}
#endif

}  // namespace

extern "C" {

const char* gated_dense(int64_t batch, int64_t input_dim, int64_t units, const float* x,
                        const float* kernel, const float* bias, const float* product, float margin,
                        float* y, float* active_fraction, unsigned long long* scratch, void* stream) {
  const lrc::GatedDenseArgs args{batch, input_dim, units, x, kernel, bias, product, margin, y, active_fraction};
  return LaunchGatedDense(args, scratch, stream);
}

const char* masked_relu(int64_t batch, int64_t units, const float* z, const float* bias,
                        const float* product, float margin, float* y, float* active_fraction,
                        unsigned long long* scratch, void* stream) {
  const lrc::MaskedReluArgs args{batch, units, z, product, bias, margin, y, active_fraction};
  return LaunchMaskedRelu(args, scratch, stream);
}

#if defined(__CUDACC__)
const char* spin(int64_t nanoseconds, void* stream) {
  SpinKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(nanoseconds);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}
#endif
}
