// What every GPU launcher does around its kernels (gated_dense_gpu.cu.cc,
// gated_layer_gpu.cu.cc): zero its counters, make the launches on the op's stream, and return
// CUDA's error message or nullptr. For nvcc only: the kernels' headers stay free of the CUDA
// runtime, for tests/cuda_shim.
#ifndef LRC_KERAS_CUSTOM_OPS_LAUNCH_ON_STREAM_CU_H_
#define LRC_KERAS_CUSTOM_OPS_LAUNCH_ON_STREAM_CU_H_

#include <cuda_runtime.h>

#include "gated_dense_gpu_kernels.cu.h"  // gpu::Geometry

namespace lrc {

// Zeroes `count` counters, then calls launches(launch), where launch(kernel, geometry, args...)
// runs kernel<<<dim3(geometry.grid, geometry.grid_y), geometry.block, 0, stream>>>(args...).
template <typename Launches>
const char* LaunchOnStream(unsigned long long* counters, int count, cudaStream_t stream, Launches launches) {
  cudaError_t error = cudaMemsetAsync(counters, 0, count * sizeof(*counters), stream);
  if (error == cudaSuccess) {
    launches([stream](auto kernel, gpu::Geometry geometry, auto... args) {
      kernel<<<dim3(geometry.grid, geometry.grid_y), geometry.block, 0, stream>>>(args...);
    });
    error = cudaGetLastError();  // the launches' own errors, which <<<>>> does not return
  }
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_LAUNCH_ON_STREAM_CU_H_
