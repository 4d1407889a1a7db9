// The contract of the LrcGatedDenseGrad op, the gated training path's backward step, shared by
// the CPU and GPU kernels.
//
// The forward LrcGatedDense (gated_dense.h) computes y[i, j] = relu(x_i·W_j + b_j) only for the
// (row, unit) pairs its estimate selects, and exactly 0 elsewhere. Its backward passes gradient
// only through the pairs that were computed and positive, y[i, j] > 0 (PassesGradient), and
// computes both products over those pairs only:
//   grad_y   [batch, units]       dL/dy
//   y        [batch, units]       the forward's output: its positive entries are the pairs
//   grad_skipped, skipped [sample_rows, units]
//                                 the active units the gate skipped in the first rows
//                                 (LrcGatedLayer's skipped, gated_layer.h) and their dL/d: their
//                                 positive entries are pairs too, with grad_skipped in place of
//                                 grad_y (y and skipped are never both positive)
//   x        [batch, input_dim]
//   kernel   [units, input_dim]   W_j is one contiguous row
//   grad_x      [batch, input_dim]   dL/dx_i = Σ_{j: pair (i, j)} grad_y[i, j] · W_j
//   grad_kernel [units, input_dim]   dL/dW_j = Σ_{i: pair (i, j)} grad_y[i, j] · x_i
//   grad_bias   [units]              dL/db_j = Σ_{i: pair (i, j)} grad_y[i, j]
// A NaN or zero y passes no gradient, as in tf.nn.relu's; so a row whose outputs are all NaN
// adds nothing anywhere (a dense GEMM would spread its 0·NaN over grad_kernel).
// Every sum runs over its pairs in increasing row (or unit) order, by one thread: results do not
// depend on scheduling. All arrays are row-major float32.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GRAD_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GRAD_H_

#include <cstdint>

#include "gated_dense.h"  // LRC_HOST_DEVICE and the forward declarations of TF and CUDA types

namespace lrc {

struct GatedDenseGradArgs {
  int64_t batch;
  int64_t input_dim;
  int64_t units;
  int64_t sample_rows;
  const float* grad_y;
  const float* y;
  const float* grad_skipped;
  const float* skipped;
  const float* x;
  const float* kernel;
  float* grad_x;
  float* grad_kernel;
  float* grad_bias;
};

LRC_HOST_DEVICE inline bool PassesGradient(float y) { return y > 0.f; }

// Whether pair (i, j) passes gradient, and its upstream gradient: y's, or in the sampled rows
// skipped's where y does not pass.
LRC_HOST_DEVICE inline bool PairPasses(const GatedDenseGradArgs& a, int64_t i, int64_t j) {
  const int64_t k = i * a.units + j;
  return PassesGradient(a.y[k]) || (i < a.sample_rows && PassesGradient(a.skipped[k]));
}
LRC_HOST_DEVICE inline float PairGradient(const GatedDenseGradArgs& a, int64_t i, int64_t j) {
  const int64_t k = i * a.units + j;
  return i < a.sample_rows && !PassesGradient(a.y[k]) ? a.grad_skipped[k] : a.grad_y[k];
}

// Specialised for Eigen::ThreadPoolDevice in gated_dense_grad_cpu.cc and Eigen::GpuDevice in
// gated_dense_grad_gpu.cc. Shapes are validated by the OpKernel (gated_dense_grad_kernels.cc).
template <typename Device>
struct GatedDenseGradFunctor {
  void operator()(tensorflow::OpKernelContext* ctx, const GatedDenseGradArgs& args);
};

template <>
void GatedDenseGradFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                                 const GatedDenseGradArgs& args);
#if GOOGLE_CUDA
template <>
void GatedDenseGradFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                          const GatedDenseGradArgs& args);

// gated_dense_grad_gpu.cu.cc launches the kernels on `stream` (a cudaStream_t); returns nullptr
// or CUDA's error message.
const char* LaunchGatedDenseGrad(const GatedDenseGradArgs& args, ::CUstream_st* stream);
#endif

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_DENSE_GRAD_H_
