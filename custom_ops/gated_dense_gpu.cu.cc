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
// This file includes only the CUDA runtime (launch_on_stream.cu.h): it compiles in seconds with nvcc, and
// libtensorflow_framework exports the runtime entry points, so no cudart is linked.
#include "gated_dense_gpu_kernels.cu.h"
#include "launch_on_stream.cu.h"

namespace lrc {

const char* LaunchGatedDense(const GatedDenseArgs& a, unsigned long long* scratch,
                             ::CUstream_st* stream) {
  return LaunchOnStream(scratch, 1, stream,
                        [&](auto launch) { gpu::LaunchGatedDenseKernels(a, scratch, launch); });
}

const char* LaunchMaskedRelu(const MaskedReluArgs& a, unsigned long long* scratch,
                             ::CUstream_st* stream) {
  return LaunchOnStream(scratch, 1, stream,
                        [&](auto launch) { gpu::LaunchMaskedReluKernels(a, scratch, launch); });
}

}  // namespace lrc
