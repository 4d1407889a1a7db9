// GPU launcher of LrcGatedLayer (the kernels, their geometry and order:
// gated_layer_gpu_kernels.cu.h).
//
// Design. One op, all on the op's stream, nothing waiting on the host: the estimate's two thin
// products by a 16×16-tiled kernel (split along the depth into chunks while the output's tiles
// leave SMs idle: x·U of a small batch), then the rows TensorFlow computed densely and the rows
// beyond by the kernels of LrcMaskedRelu and LrcGatedDense (gated_dense_gpu.cu.cc's design),
// each reading the estimate from y's buffer, the sampled rows' statistics first.
// Expected: the products are far from cuBLAS' speed on large batches (no register tiling, no
// tensor cores), but they are r·(d + n) multiply-adds a row against the gated kernel's
// ρ·n·d, and the op saves the launches and the [batch, units] passes of the TensorFlow ops
// it replaces; tools/gpu_check/ times it against a dense cuBLAS layer.
//
// This file includes only the CUDA runtime (launch_on_stream.cu.h): it compiles in seconds
// with nvcc, and libtensorflow_framework exports the runtime entry points, so no cudart is linked.
#include "gated_layer_gpu_kernels.cu.h"
#include "launch_on_stream.cu.h"

namespace lrc {

int64_t GatedLayerPartialSumFloats(const GatedLayerArgs& a) { return gpu::GatedLayerPartialSums(a); }

const char* LaunchGatedLayer(const GatedLayerArgs& a, unsigned long long* counters, float* partial_sums,
                             ::CUstream_st* stream) {
  return LaunchOnStream(counters, kGatedLayerCounters, stream, [&](auto launch) {
    gpu::LaunchGatedLayerKernels(a, counters, partial_sums, launch);
  });
}

}  // namespace lrc
