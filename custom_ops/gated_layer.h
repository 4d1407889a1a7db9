// The contract of LrcGatedLayer, a gated layer's whole forward in one op, shared by the CPU and
// GPU kernels. It replaces the pipeline of small TensorFlow ops around the kernels (the estimate's
// two products, the mask, the sampled rows' statistics, the traced-rank check), whose count, not
// size, was the cost. The dense product TensorFlow's tuned GEMM does best (x·Wᵀ for the rows
// computed densely) stays TensorFlow's, an input here.
//
// LrcGatedLayer(x, factors, kernel, bias, margin, z, rank_now; attrs rank, sample_rows, layer):
//   x        [batch, input_dim]
//   factors  [rank·(input_dim + units)]   U [input_dim, rank] then V [rank, units], row-major:
//                                         the layer's estimator_factors, one variable
//   kernel   [units, input_dim]           unit j's weights W_j are one contiguous row
//   bias     [units]
//   margin   scalar, finite
//   z        [dense_rows, units]          x_i·W_j for the first dense_rows <= batch rows,
//                                         without the bias (TensorFlow's GEMM; 0 rows at gated
//                                         inference, the sampled rows in gated training, every
//                                         row on the dense path)
//   rank_now int32 scalar                 the layer's estimator_rank now (host memory)
// With z_hat[i, j] = (x_i·U)·V_j + bias_j (computed here) and computed(i, j) =
// UnitIsComputed(z_hat[i, j], margin):
//   y[i, j]        = relu(z[i, j] + bias_j) for i < dense_rows, relu(x_i·W_j + bias_j) beyond
//                    (only the computed pairs' dot products are made), where computed(i, j);
//                    exactly 0 elsewhere.                                     [batch, units]
//   skipped[i, j]  = relu(z[i, j] + bias_j) where not computed(i, j), else 0, for the first
//                    min(sample_rows, dense_rows) rows: the active units the gate skipped.
//   gate_counts    = over those rows, (true positives, false positives, false negatives, true
//                    negatives) of computed(i, j) against z[i, j] + bias_j > 0. [4] float
//   active_fraction = computed pairs / (batch · units), 0 when empty.         scalar
// A rank_now other than the rank attr, or a factors length other than rank·(input_dim + units),
// is the sign of a function traced before a set_rank: the op fails with a message that names the
// layer (attr layer), both ranks and the sizes. A non-finite margin fails too.
//
// The backward over the same pairs, y's positive entries and the sampled rows' skipped ones, is
// LrcGatedDenseGrad with its sample inputs (gated_dense_grad.h).
// All arrays are row-major float32.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_LAYER_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_LAYER_H_

#include <cstdint>

#include "gated_dense.h"  // UnitIsComputed, MaskedRelu, GatedDenseArgs, the TF and CUDA types

namespace lrc {

struct GatedLayerArgs {
  int64_t batch;
  int64_t input_dim;
  int64_t units;
  int64_t rank;
  int64_t dense_rows;
  int64_t sample_rows;  // min(the attr, dense_rows): the rows of skipped
  const float* x;
  const float* factors;
  const float* kernel;
  const float* bias;
  float margin;
  const float* z;
  float* projected;  // scratch [batch, rank]: x·U
  float* y;          // also the estimate's product (x·U)·V until each element is written
  float* skipped;
  float* gate_counts;      // four floats, in the device's memory
  float* active_fraction;  // one float, in the device's memory
};

// The GPU kernels' uint64 counters: computed pairs, then the four gate counts.
constexpr int kGatedLayerCounters = 5;

// Specialised for Eigen::ThreadPoolDevice in gated_layer_cpu.cc and Eigen::GpuDevice in
// gated_layer_gpu.cc. Shapes are validated by the OpKernels (gated_layer_kernels.cc).
template <typename Device>
struct GatedLayerFunctor {
  void operator()(tensorflow::OpKernelContext* ctx, const GatedLayerArgs& args);
};

template <>
void GatedLayerFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const GatedLayerArgs& args);
#if GOOGLE_CUDA
template <>
void GatedLayerFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                      const GatedLayerArgs& args);

// gated_layer_gpu.cu.cc launches the kernels on `stream` (a cudaStream_t), counting in
// `counters` (kGatedLayerCounters device uint64s) and adding the estimate's split products in
// `partial_sums` (GatedLayerPartialSumFloats(args) device floats); returns nullptr or CUDA's
// error message.
int64_t GatedLayerPartialSumFloats(const GatedLayerArgs& args);
const char* LaunchGatedLayer(const GatedLayerArgs& args, unsigned long long* counters,
                             float* partial_sums, ::CUstream_st* stream);
#endif

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_LAYER_H_
