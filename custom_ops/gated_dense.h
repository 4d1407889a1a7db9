// The contract of the LrcGatedDense op, shared by the CPU and GPU kernels.
//
// The estimate z_hat = (x·U)·V + b is two thin dense GEMMs, r·(d + n) multiply-adds a row; the
// Python wrapper (lrc_keras/ops.py) computes the product p = (x·U)·V with TensorFlow's own
// matmul, which is tuned for every ISA, and hands it to the ops below, which add the bias.
//
// LrcGatedDense: the part no library does, computing only the selected units.
//   x        [batch, input_dim]
//   kernel   [units, input_dim]   unit j's weights W_j are one contiguous row
//   bias     [units]
//   product  [batch, units]       (x·U)·V, without the bias
//   y        [batch, units]
// For every row i and unit j, with z_hat[i, j] = product[i, j] + bias_j:
//   y[i, j] = relu(x_i · W_j + bias_j)  if UnitIsComputed(z_hat[i, j], margin)
//           = 0                         otherwise, and x_i · W_j is never computed.
//   active_fraction = (number of computed (i, j)) / (batch * units), 0 when empty.
//
// LrcMaskedRelu: the same y from a dense GEMM (for batches where that is faster), in one pass.
//   z        [batch, units]       x·W, without the bias
//   product, bias, margin, y, active_fraction as above.
// All arrays are row-major float32.
#ifndef LRC_KERAS_CUSTOM_OPS_GATED_DENSE_H_
#define LRC_KERAS_CUSTOM_OPS_GATED_DENSE_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LRC_HOST_DEVICE __host__ __device__
#else
#define LRC_HOST_DEVICE
#endif

namespace tensorflow {
class OpKernelContext;
}
namespace Eigen {
struct ThreadPoolDevice;
struct GpuDevice;
}  // namespace Eigen
struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace lrc {

struct GatedDenseArgs {
  int64_t batch;
  int64_t input_dim;
  int64_t units;
  const float* x;
  const float* kernel;
  const float* bias;
  const float* product;
  float margin;
  float* y;
  float* active_fraction;  // one float, in the device's memory
};

// NaN estimates count as computed, so that NaN inputs reach the output.
LRC_HOST_DEVICE inline bool UnitIsComputed(float z_hat, float margin) {
  return !(z_hat <= -margin);
}

// relu(z) where selected (NaN stays NaN: !(NaN < 0)), else exactly 0, as bit operations: with
// random masks and signs a branch here is mispredicted half the time (it tripled the masking pass).
LRC_HOST_DEVICE inline float MaskedRelu(float z, bool selected) {
  const uint32_t keep = (0u - static_cast<uint32_t>(selected)) & (0u - static_cast<uint32_t>(!(z < 0.f)));
  uint32_t bits;
  memcpy(&bits, &z, sizeof(bits));
  bits &= keep;
  float result;
  memcpy(&result, &bits, sizeof(result));
  return result;
}

struct MaskedReluArgs {
  int64_t batch;
  int64_t units;
  const float* z;
  const float* product;
  const float* bias;
  float margin;
  float* y;
  float* active_fraction;  // one float, in the device's memory
};

// Specialised for Eigen::ThreadPoolDevice in gated_dense_cpu.cc and Eigen::GpuDevice in
// gated_dense_gpu.cc. Shapes are validated by the OpKernel (gated_dense_kernels.cc) before the call.
template <typename Device>
struct GatedDenseFunctor {
  void operator()(tensorflow::OpKernelContext* ctx, const GatedDenseArgs& args);
};

template <typename Device>
struct MaskedReluFunctor {
  void operator()(tensorflow::OpKernelContext* ctx, const MaskedReluArgs& args);
};

template <>
void GatedDenseFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const GatedDenseArgs& args);
template <>
void MaskedReluFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const MaskedReluArgs& args);
#if GOOGLE_CUDA
template <>
void GatedDenseFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                      const GatedDenseArgs& args);
template <>
void MaskedReluFunctor<Eigen::GpuDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                      const MaskedReluArgs& args);
#endif

#if GOOGLE_CUDA
// gated_dense_gpu.cu.cc launches the kernels on `stream` (a cudaStream_t), counting computed
// pairs in `scratch` (one device uint64); each returns nullptr or CUDA's error message.
const char* LaunchGatedDense(const GatedDenseArgs& args, unsigned long long* scratch,
                             ::CUstream_st* stream);
const char* LaunchMaskedRelu(const MaskedReluArgs& args, unsigned long long* scratch,
                             ::CUstream_st* stream);
#endif

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_GATED_DENSE_H_
