// GPU launchers for LrcGatedDense and LrcMaskedRelu (the kernels: gated_dense_gpu_kernels.cu.h).
//
// Design. The estimate's two thin GEMMs, (x·U)·V, run in TensorFlow's own matmul (cuBLAS) on
// the op's stream, as on the CPU; this file does the part no library does:
//   LrcGatedDense: blocks of 8 units × tiles of up to 32 rows; one warp takes one unit on one
//     tile. Each lane reads the estimate of its own row, a ballot gives the warp the tile's
//     selected rows, and a skipped (i, j) costs that one read and a store of 0. Selected rows
//     are computed 4 at a time: the 32 lanes stride the input dimension (coalesced 128-byte
//     reads of W_j and the x rows), each W_j element read once for the 4 rows, and reduce with
//     5 shuffles a row. Tiles are as tall as the grid allows while it still has ~8k warps (a
//     full H100/H200), so a batch of 16 spreads over every SM and a batch of 256 reads W_j
//     once per 4 selected rows of a 32-row tile, from L2. DRAM traffic is about n·d (the
//     weights of units selected anywhere in the batch) + B·d (x) floats, and the work
//     ρ·B·n·d/32 warp-steps spread over all SMs.
//     Expected: memory-bound near bandwidth at small batches (as the CPU's gathered GEMV);
//     at large batches cuBLAS' dense GEMM (tensor cores) wins unit for unit above some
//     density, and the layer's dispatch (lrc_keras/dispatch.py) then takes the GEMM path.
//     tools/gpu_check/ checks and times these kernels on a GPU without TensorFlow.
//   LrcMaskedRelu: that GEMM path's epilogue, one grid-stride elementwise pass.
// Counts of computed pairs are warp-reduced and added atomically to one uint64; a one-thread
// kernel turns the count into the active fraction on the device, so nothing waits on the host.
//
// This file includes only the CUDA runtime: it compiles in seconds with nvcc, and
// libtensorflow_framework exports the runtime entry points, so no cudart is linked.
#include <cuda_runtime.h>

#include "gated_dense_gpu_kernels.cu.h"

namespace lrc {
namespace {

// Zeroes the count, then makes the launches of gated_dense_gpu_kernels.cu.h on `stream`.
template <typename Args, typename Launches>
const char* LaunchOnStream(const Args& a, unsigned long long* scratch, cudaStream_t stream,
                           Launches launches) {
  cudaError_t error = cudaMemsetAsync(scratch, 0, sizeof(*scratch), stream);
  if (error == cudaSuccess) {
    launches(a, scratch, [stream](auto kernel, gpu::Geometry geometry, auto... args) {
      kernel<<<dim3(geometry.grid, geometry.grid_y), geometry.block, 0, stream>>>(args...);
    });
    error = cudaGetLastError();  // the launches' own errors, which <<<>>> does not return
  }
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* LaunchGatedDense(const GatedDenseArgs& a, unsigned long long* scratch,
                             ::CUstream_st* stream) {
  return LaunchOnStream(a, scratch, stream, [](auto&&... args) { gpu::LaunchGatedDenseKernels(args...); });
}

const char* LaunchMaskedRelu(const MaskedReluArgs& a, unsigned long long* scratch,
                             ::CUstream_st* stream) {
  return LaunchOnStream(a, scratch, stream, [](auto&&... args) { gpu::LaunchMaskedReluKernels(args...); });
}

}  // namespace lrc
