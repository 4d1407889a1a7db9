// GPU launcher of LrcGatedDenseGrad (the kernels and their geometry:
// gated_dense_grad_gpu_kernels.cu.h).
//
// Design. Each of the two products is its own kernel with a warp per owner (a unit for dW and
// db, a row for dx) and 128-column tile: the warp votes over 32 pairs at a time on y > 0 and
// sums g·x_i (or g·W_j) only for those that pass, each lane over 4 columns, in registers, with
// coalesced reads of the rows. The work is the passing pairs' multiply-adds plus one read of y
// and grad_y a pair a tile, with no atomics, no scratch and a fixed order of summation.
// Expected: bound by the reads of the passing pairs' rows, from L2 after the first tile; the
// dense GEMMs (cuBLAS, tensor cores) win above some density, as in the forward.
//
// This file includes only the CUDA runtime: it compiles in seconds with nvcc, and
// libtensorflow_framework exports the runtime entry points, so no cudart is linked.
#include <cuda_runtime.h>

#include "gated_dense_grad_gpu_kernels.cu.h"

namespace lrc {

const char* LaunchGatedDenseGrad(const GatedDenseGradArgs& a, ::CUstream_st* stream) {
  gpu_grad::LaunchGatedDenseGradKernels(
      a, [stream](auto kernel, gpu_grad::Geometry geometry, auto... args) {
        kernel<<<geometry.grid, geometry.block, 0, stream>>>(args...);
      });
  // The launches' own errors, which <<<>>> does not return.
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace lrc
