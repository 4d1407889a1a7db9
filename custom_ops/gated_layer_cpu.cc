// CPU functor of LrcGatedLayer (gated_layer.h): TensorFlow's worker
// threads, AVX-512 / AVX2+FMA / baseline chosen at run time (isa.h).
//
// LrcGatedLayer runs, in one call:
//   1. the estimate's product (x·U)·V into y's buffer (low_rank_impl.h), x·U into scratch
//      [batch, rank] (the one allocation, sized by the work);
//   2. the rows TensorFlow's GEMM computed densely (z): the sampled rows' skipped units and
//      gate counts, then y = MaskedRelu(z + b) where the estimate selects, for all of them;
//   3. the other rows by the gated kernel (gated_dense_cpu.cc), which reads each estimate from
//      y's buffer before it writes that element.
#define EIGEN_USE_THREADS
#include <algorithm>
#include <atomic>

#include "gated_layer.h"
#include "isa.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

using MultiplyBlockFn = void (*)(const float* a, int64_t lda, const float* b, int64_t ldb,
                                 int64_t depth, float* c, int64_t ldc, int64_t rows, int64_t columns);

// One ISA's loops for the estimate: blocks of row_block rows × panel_columns columns.
struct LowRankKernels {
  int row_block;
  int64_t panel_columns;
  MultiplyBlockFn multiply_block;
};

}  // namespace

// One copy of low_rank_impl.h per instruction set, on that set's primitives (isa.h).
#define LRC_ISA_COPY "low_rank_impl.h"
#include "isa_copies.h"

namespace {

const LowRankKernels& SelectedLowRankKernels() {
  static const LowRankKernels kernels = [] {
    switch (SelectedIsa()) {
      case Isa::kAvx512:
        return avx512::MakeLowRankKernels();
      case Isa::kAvx2:
        return avx2::MakeLowRankKernels();
      case Isa::kPortable:
        break;
    }
    return portable::MakeLowRankKernels();
  }();
  return kernels;
}

// c [rows, columns] = a [rows, depth] · b [depth, columns], row-major, rows lda / ldb / ldc floats
// apart. Threads take (column panel, row block) items, a panel's row blocks in a row, so that a
// thread's panel of b stays in its caches.
void Multiply(tsl::thread::ThreadPool* workers, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc, int64_t rows, int64_t depth, int64_t columns) {
  const LowRankKernels& kernels = SelectedLowRankKernels();
  const int64_t row_blocks = (rows + kernels.row_block - 1) / kernels.row_block;
  const int64_t panels = (columns + kernels.panel_columns - 1) / kernels.panel_columns;
  // Cycles an item: ~1 a multiply-add of a vector pair, two of them a block row and depth step.
  const int64_t item_cost = std::max<int64_t>(1, kernels.row_block * depth);
  workers->ParallelFor(row_blocks * panels, item_cost, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item % row_blocks * kernels.row_block;
      const int64_t column = item / row_blocks * kernels.panel_columns;
      kernels.multiply_block(a + row * lda, lda, b + column, ldb, depth, c + row * ldc + column, ldc,
                             std::min<int64_t>(kernels.row_block, rows - row),
                             std::min(kernels.panel_columns, columns - column));
    }
  });
}

}  // namespace

template <>
void GatedLayerFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const GatedLayerArgs& a) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  std::fill(a.gate_counts, a.gate_counts + 4, 0.f);
  *a.active_fraction = 0.f;
  if (a.batch == 0 || a.units == 0) return;
  // 1. The estimate's product, without the bias.
  const float* u = a.factors;
  const float* v = a.factors + a.input_dim * a.rank;
  Multiply(workers, a.x, a.input_dim, u, a.rank, a.projected, a.rank, a.batch, a.input_dim, a.rank);
  Multiply(workers, a.projected, a.rank, v, a.units, a.y, a.units, a.batch, a.rank, a.units);

  // 2. The rows computed densely: counts of the sampled ones first, then y for all, row by row
  // (each row's estimates are read before y overwrites them).
  std::atomic<int64_t> computed{0};
  std::atomic<int64_t> counts[4] = {};
  workers->ParallelFor(a.dense_rows, 6 * a.units, [&](int64_t begin, int64_t end) {
    // Locals, not a.*: a store through y could otherwise alias them and block vectorising.
    const float* z = a.z;
    const float* bias = a.bias;
    float* y = a.y;
    const float margin = a.margin;
    const int64_t units = a.units;
    int64_t selected = 0;
    int64_t local[4] = {};  // true positives, false positives, false negatives, true negatives
    for (int64_t i = begin; i < end; ++i) {
      const float* zi = z + i * units;
      float* yi = y + i * units;
      if (i < a.sample_rows) {
        float* skipped = a.skipped + i * units;
        for (int64_t j = 0; j < units; ++j) {
          const bool computes = UnitIsComputed(yi[j] + bias[j], margin);
          const float pre_activation = zi[j] + bias[j];
          const bool positive = pre_activation > 0.f;
          skipped[j] = MaskedRelu(pre_activation, !computes);
          ++local[(computes ? 0 : 2) + (positive ? 0 : 1)];
        }
      }
      for (int64_t j = 0; j < units; ++j) {
        const bool computes = UnitIsComputed(yi[j] + bias[j], margin);
        yi[j] = MaskedRelu(zi[j] + bias[j], computes);
        selected += computes;
      }
    }
    computed += selected;
    for (int k = 0; k < 4; ++k) counts[k] += local[k];
  });
  for (int k = 0; k < 4; ++k) a.gate_counts[k] = static_cast<float>(counts[k].load());

  // 3. The other rows, by the gated kernel, the estimate read from y's buffer.
  float gated_fraction = 0.f;
  const int64_t gated_rows = a.batch - a.dense_rows;
  if (gated_rows > 0) {
    const int64_t offset = a.dense_rows * a.units;
    const GatedDenseArgs gated{gated_rows, a.input_dim, a.units, a.x + a.dense_rows * a.input_dim,
                               a.kernel,   a.bias,      a.y + offset, a.margin, a.y + offset,
                               &gated_fraction};
    GatedDenseFunctor<Eigen::ThreadPoolDevice>()(ctx, gated);
    if (!ctx->status().ok()) return;
  }
  const double pairs = static_cast<double>(a.batch) * a.units;
  *a.active_fraction = static_cast<float>(
      (computed.load() + static_cast<double>(gated_fraction) * gated_rows * a.units) / pairs);
}

}  // namespace lrc
