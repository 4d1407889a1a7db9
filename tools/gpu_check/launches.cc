// The C API that gpu_check.py loads with ctypes: the ops' own launches of
// custom_ops/gated_dense_gpu_kernels.cu.h, gated_dense_grad_gpu_kernels.cu.h and
// gated_layer_gpu_kernels.cu.h, without TensorFlow. gpu_check.py builds it either
//   with nvcc, together with custom_ops/gated_dense_gpu.cu.cc (LaunchGatedDense and
//     LaunchMaskedRelu), gated_dense_grad_gpu.cu.cc (LaunchGatedDenseGrad) and
//     gated_layer_gpu.cu.cc (LaunchGatedLayer), exactly as the ops call them: pointers are
//     device pointers and `stream` a cudaStream_t; or
//   with g++ on the CPU shim of the tests (tests/cuda_shim): pointers are host pointers, the
//     kernels run on the CPU before the call returns, and `stream` is ignored.
// Each function returns nullptr or an error message.
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include "gated_dense.h"
#include "gated_dense_grad.h"
#include "gated_layer.h"
#else
#include "cuda_shim.h"
#include "gated_dense_gpu_kernels.cu.h"
#include "gated_dense_grad_gpu_kernels.cu.h"
#include "gated_layer_gpu_kernels.cu.h"
#endif

namespace {

#if defined(__CUDACC__)
const char* LaunchGatedDense(const lrc::GatedDenseArgs& args, unsigned long long* scratch, void* stream) {
  return lrc::LaunchGatedDense(args, scratch, static_cast<cudaStream_t>(stream));
}

const char* LaunchMaskedRelu(const lrc::MaskedReluArgs& args, unsigned long long* scratch, void* stream) {
  return lrc::LaunchMaskedRelu(args, scratch, static_cast<cudaStream_t>(stream));
}

const char* LaunchGatedDenseGrad(const lrc::GatedDenseGradArgs& args, void* stream) {
  return lrc::LaunchGatedDenseGrad(args, static_cast<cudaStream_t>(stream));
}

const char* LaunchGatedLayer(const lrc::GatedLayerArgs& args, unsigned long long* counters, float* partial_sums,
                             void* stream) {
  return lrc::LaunchGatedLayer(args, counters, partial_sums, static_cast<cudaStream_t>(stream));
}

int64_t PartialSumFloats(const lrc::GatedLayerArgs& args) { return lrc::GatedLayerPartialSumFloats(args); }

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

// What gated_dense_grad_gpu.cu.cc does on the GPU: the launches on a one-dimensional grid.
const char* LaunchGatedDenseGrad(const lrc::GatedDenseGradArgs& args, void*) {
  lrc::gpu_grad::LaunchGatedDenseGradKernels(
      args, [](auto kernel, lrc::gpu_grad::Geometry geometry, auto... kernel_args) {
        cuda_shim::Launch(geometry.grid, 1, geometry.block, kernel, kernel_args...);
      });
  return nullptr;
}

// What gated_layer_gpu.cu.cc does on the GPU: zero the counters, then launch.
const char* LaunchGatedLayer(const lrc::GatedLayerArgs& args, unsigned long long* counters, float* partial_sums,
                             void*) {
  std::fill(counters, counters + lrc::kGatedLayerCounters, 0ull);
  lrc::gpu::LaunchGatedLayerKernels(args, counters, partial_sums, cuda_shim::kLaunchOnCpu);
  return nullptr;
}

int64_t PartialSumFloats(const lrc::GatedLayerArgs& args) { return lrc::gpu::GatedLayerPartialSums(args); }
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

const char* gated_dense_grad(int64_t batch, int64_t input_dim, int64_t units, const float* grad_y,
                             const float* y, const float* x, const float* kernel, float* grad_x,
                             float* grad_kernel, float* grad_bias, void* stream) {
  const lrc::GatedDenseGradArgs args{batch,  input_dim, units,  0,           grad_y,   y, nullptr,
                                     nullptr, x,     kernel, grad_x, grad_kernel, grad_bias};
  return LaunchGatedDenseGrad(args, stream);
}

// LrcGatedLayer (custom_ops/gated_layer.h): `projected` holds batch·rank floats, `counters`
// kGatedLayerCounters uint64s and `partial_sums` gated_layer_partial_sums(...) floats.
const char* gated_layer(int64_t batch, int64_t input_dim, int64_t units, int64_t rank, int64_t dense_rows,
                        int64_t sample_rows, const float* x, const float* factors, const float* kernel,
                        const float* bias, float margin, const float* z, float* projected, float* y, float* skipped,
                        float* gate_counts, float* active_fraction, unsigned long long* counters,
                        float* partial_sums, void* stream) {
  const lrc::GatedLayerArgs args{batch, input_dim, units, rank, dense_rows, sample_rows, x, factors, kernel, bias,
                                 margin, z, projected, y, skipped, gate_counts, active_fraction};
  return LaunchGatedLayer(args, counters, partial_sums, stream);
}

int64_t gated_layer_partial_sums(int64_t batch, int64_t input_dim, int64_t units, int64_t rank) {
  lrc::GatedLayerArgs args{};
  args.batch = batch;
  args.input_dim = input_dim;
  args.units = units;
  args.rank = rank;
  return PartialSumFloats(args);
}

int gated_layer_counters() { return lrc::kGatedLayerCounters; }

#if defined(__CUDACC__)
const char* spin(int64_t nanoseconds, void* stream) {
  SpinKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(nanoseconds);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}
#endif
}
