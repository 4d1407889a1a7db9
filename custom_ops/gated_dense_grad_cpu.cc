// CPU functor of LrcGatedDenseGrad: TensorFlow's worker threads, AVX-512 / AVX2+FMA / baseline
// chosen at run time (isa.h).
//
// 1. Lists. The pairs (row i, unit j) with y[i, j] > 0 are listed per owner, with grad_y at each:
//    one pass counts them (and sums grad_bias), a prefix sum places the lists, a second pass
//    fills them. The lists are the only scratch: 8 bytes a pair and 9 an owner, allocated from
//    TensorFlow's allocator, so their size follows the work and a failure is an error status.
// 2. Products. Threads split the input dimension into column chunks, so that no two threads
//    ever write the same element of grad_x or grad_kernel: no locks, no per-thread copies.
//    Within its chunk a thread walks the owners: for unit j it holds W_j's chunk and dW_j's
//    running sum in registers, and for each of its rows i adds g·x_i to dW_j and g·W_j to
//    grad_x_i in memory (pair_axpy_impl.h). The chunk of x and grad_x (batch × 128 floats each
//    on AVX-512) stays in L2 while W streams past once.
#define EIGEN_USE_THREADS
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gated_dense_grad.h"
#include "isa.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

constexpr int64_t kFloatsPerLine = 64 / sizeof(float);  // one 64-byte cache line
// Vectors per column chunk: 8 (16 of 32 AVX-512 registers for W_j's chunk and dW_j's sum).
constexpr int kChunkVectors = 8;

using PairChunkFn = void (*)(const float* held, const int32_t* others, const float* grads,
                             int64_t count, const float* other, float* other_grad, int64_t stride,
                             float* held_grad, const float* ahead);
using PairColumnsFn = void (*)(const float* held, const int32_t* others, const float* grads,
                               int64_t count, const float* other, float* other_grad, int64_t stride,
                               float* held_grad, int64_t columns);

}  // namespace

// One copy of pair_axpy_impl.h per instruction set (isa.h defines each one's primitives).
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
#include "pair_axpy_impl.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "pair_axpy_impl.h"
}  // namespace avx2
#pragma GCC pop_options

namespace portable {
#include "pair_axpy_impl.h"
}  // namespace portable

namespace {

// An ISA's loops: pieces[0] covers a whole chunk (kChunkVectors vectors), pieces[1..3] half,
// a quarter and an eighth of it, for the matrix's last, narrower chunk; `columns` the columns
// beyond the last whole vector.
struct PairKernels {
  int64_t width;  // floats a vector
  PairChunkFn pieces[4];
  PairColumnsFn columns;
};

PairKernels ChoosePairKernels() {
  static_assert(kChunkVectors == 8, "pieces are 8, 4, 2 and 1 vectors");
  switch (SelectedIsa()) {
    case Isa::kAvx512:
      return {avx512::kWidth,
              {avx512::PairChunk<8>, avx512::PairChunk<4>, avx512::PairChunk<2>, avx512::PairChunk<1>},
              avx512::PairColumns};
    case Isa::kAvx2:
      return {avx2::kWidth,
              {avx2::PairChunk<8>, avx2::PairChunk<4>, avx2::PairChunk<2>, avx2::PairChunk<1>},
              avx2::PairColumns};
    case Isa::kPortable:
      break;
  }
  return {portable::kWidth,
          {portable::PairChunk<8>, portable::PairChunk<4>, portable::PairChunk<2>, portable::PairChunk<1>},
          portable::PairColumns};
}

const PairKernels& SelectedPairKernels() {
  static const PairKernels kernels = ChoosePairKernels();
  return kernels;
}

// Pairs listed per owner: owner o's are entries [first[o], first[o] + count(o)) of `others` (the
// row or unit at the other end) and `grads` (grad_y there). Each list is followed by one spare
// entry, which the branch-free fill writes and then overwrites or leaves.
struct PairLists {
  const int64_t* first;  // [owners + 1]; count(o) = first[o + 1] - first[o] - 1
  const int32_t* others;
  const float* grads;
  int64_t Count(int64_t owner) const { return first[owner + 1] - first[owner] - 1; }
};

// Which side owns the lists. Units: W_j in registers, grad_x scattered (batch × chunk floats
// touched per chunk). Rows: x_i in registers, grad_kernel scattered (units × chunk floats).
enum class Owner { kUnit, kRow };

Owner ChooseOwner(const GatedDenseGradArgs& a) {
  const char* forced = std::getenv("LRC_GRAD_OWNER");  // measurement only
  if (forced && std::string(forced) == "row") return Owner::kRow;
  if (forced && std::string(forced) == "unit") return Owner::kUnit;
  return a.batch <= a.units ? Owner::kUnit : Owner::kRow;
}

// Units in a block of the counting and filling passes: their counters live in registers.
constexpr int64_t kUnitBlock = 64;

// Per unit: the number of pairs (into counts[j]) and grad_bias, summed in row order.
void CountUnitPairs(const GatedDenseGradArgs& a, int64_t begin, int64_t end, int64_t* counts) {
  for (int64_t block = begin; block < end; block += kUnitBlock) {
    const int64_t width = std::min(kUnitBlock, end - block);
    int32_t count[kUnitBlock] = {};
    float sum[kUnitBlock] = {};
    for (int64_t i = 0; i < a.batch; ++i) {
      const float* y = a.y + i * a.units + block;
      const float* grad_y = a.grad_y + i * a.units + block;
      for (int64_t u = 0; u < width; ++u) {
        const bool passes = PassesGradient(y[u]);
        count[u] += passes;
        sum[u] += passes ? grad_y[u] : 0.f;
      }
    }
    for (int64_t u = 0; u < width; ++u) {
      counts[block + u] = count[u];
      a.grad_bias[block + u] = sum[u];
    }
  }
}

void CountRowPairs(const GatedDenseGradArgs& a, int64_t begin, int64_t end, int64_t* counts) {
  for (int64_t i = begin; i < end; ++i) {
    const float* y = a.y + i * a.units;
    int64_t count = 0;
    for (int64_t j = 0; j < a.units; ++j) count += PassesGradient(y[j]);
    counts[i] = count;
  }
}

void FillUnitLists(const GatedDenseGradArgs& a, int64_t begin, int64_t end, const int64_t* first,
                   int32_t* others, float* grads) {
  for (int64_t block = begin; block < end; block += kUnitBlock) {
    const int64_t width = std::min(kUnitBlock, end - block);
    int64_t next[kUnitBlock];
    for (int64_t u = 0; u < width; ++u) next[u] = first[block + u];
    for (int64_t i = 0; i < a.batch; ++i) {
      const float* y = a.y + i * a.units + block;
      const float* grad_y = a.grad_y + i * a.units + block;
      for (int64_t u = 0; u < width; ++u) {
        others[next[u]] = static_cast<int32_t>(i);
        grads[next[u]] = grad_y[u];
        next[u] += PassesGradient(y[u]);
      }
    }
  }
}

void FillRowLists(const GatedDenseGradArgs& a, int64_t begin, int64_t end, const int64_t* first,
                  int32_t* others, float* grads) {
  for (int64_t i = begin; i < end; ++i) {
    const float* y = a.y + i * a.units;
    const float* grad_y = a.grad_y + i * a.units;
    int64_t next = first[i];
    for (int64_t j = 0; j < a.units; ++j) {
      others[next] = static_cast<int32_t>(j);
      grads[next] = grad_y[j];
      next += PassesGradient(y[j]);
    }
  }
}

// Columns [column, column + columns) of every owner's products (columns <= one chunk).
void ComputeChunk(const GatedDenseGradArgs& a, Owner owner, const PairLists& lists, int64_t column,
                  int64_t columns) {
  const PairKernels& kernels = SelectedPairKernels();
  const bool by_unit = owner == Owner::kUnit;
  const int64_t owners = by_unit ? a.units : a.batch;
  const int64_t scattered_rows = by_unit ? a.batch : a.units;
  const float* held = (by_unit ? a.kernel : a.x) + column;
  float* held_grad = (by_unit ? a.grad_kernel : a.grad_x) + column;
  const float* other = (by_unit ? a.x : a.kernel) + column;
  float* other_grad = (by_unit ? a.grad_x : a.grad_kernel) + column;
  const int64_t stride = a.input_dim;
  for (int64_t r = 0; r < scattered_rows; ++r) {
    std::memset(other_grad + r * stride, 0, columns * sizeof(float));
  }
  for (int64_t o = 0; o < owners; ++o) {
    const int32_t* others = lists.others + lists.first[o];
    const float* grads = lists.grads + lists.first[o];
    const int64_t count = lists.Count(o);
    const float* held_row = held + o * stride;
    float* held_grad_row = held_grad + o * stride;
    const float* ahead = o + 1 < owners ? held_row + stride : held_row;
    // The whole chunk, or the matrix's last one in pieces of 4, 2, 1 vectors and then columns.
    int64_t done = 0;
    for (int piece = 0; piece < 4; ++piece) {
      const int64_t piece_columns = (kChunkVectors >> piece) * kernels.width;
      if (columns - done >= piece_columns) {
        kernels.pieces[piece](held_row + done, others, grads, count, other + done, other_grad + done,
                              stride, held_grad_row + done, ahead + done);
        done += piece_columns;
      }
    }
    if (done < columns) {
      kernels.columns(held_row + done, others, grads, count, other + done, other_grad + done, stride,
                      held_grad_row + done, columns - done);
    }
  }
}

}  // namespace

template <>
void GatedDenseGradFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                                 const GatedDenseGradArgs& a) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const Owner owner = ChooseOwner(a);
  const int64_t owners = owner == Owner::kUnit ? a.units : a.batch;

  // 1. Count, place and fill the lists.
  tensorflow::Tensor first_tensor, others_tensor, grads_tensor;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, tensorflow::TensorShape({owners + 1}),
                                         &first_tensor));
  int64_t* first = first_tensor.flat<int64_t>().data();
  // Counts go to first[1..owners]; grad_bias is summed by units in both cases.
  std::vector<int64_t> unit_counts(owner == Owner::kRow ? a.units : 0);
  int64_t* const unit_count_target = owner == Owner::kUnit ? first + 1 : unit_counts.data();
  workers->ParallelFor(a.units, 4 * a.batch, [&](int64_t begin, int64_t end) {
    CountUnitPairs(a, begin, end, unit_count_target);
  });
  if (owner == Owner::kRow) {
    workers->ParallelFor(a.batch, 2 * a.units, [&](int64_t begin, int64_t end) {
      CountRowPairs(a, begin, end, first + 1);
    });
  }
  first[0] = 0;
  for (int64_t o = 0; o < owners; ++o) first[o + 1] += first[o] + 1;  // + the spare entry
  const int64_t entries = first[owners];
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT32, tensorflow::TensorShape({entries}),
                                         &others_tensor));
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, tensorflow::TensorShape({entries}),
                                         &grads_tensor));
  int32_t* others = others_tensor.flat<int32_t>().data();
  float* grads = grads_tensor.flat<float>().data();
  if (owner == Owner::kUnit) {
    workers->ParallelFor(a.units, 4 * a.batch, [&](int64_t begin, int64_t end) {
      FillUnitLists(a, begin, end, first, others, grads);
    });
  } else {
    workers->ParallelFor(a.batch, 4 * a.units, [&](int64_t begin, int64_t end) {
      FillRowLists(a, begin, end, first, others, grads);
    });
  }

  // 2. Both products, chunk by chunk of columns.
  const PairLists lists{first, others, grads};
  const int64_t chunk = kChunkVectors * SelectedPairKernels().width;
  const int64_t chunks = (a.input_dim + chunk - 1) / chunk;
  const int64_t pairs = entries - owners;
  // Cycles a chunk: ~4 per vector of each pair (two multiply-adds, a read-modify-write), and
  // the owners' loads and stores.
  const int64_t chunk_cost = kChunkVectors * (4 * pairs + 2 * owners) + 8 * (owner == Owner::kUnit ? a.batch : a.units);
  workers->ParallelFor(chunks, chunk_cost, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t column = c * chunk;
      ComputeChunk(a, owner, lists, column, std::min(chunk, a.input_dim - column));
    }
  });
}

}  // namespace lrc
