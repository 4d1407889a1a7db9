// CPU GatedDenseFunctor: TensorFlow's worker threads, AVX2/FMA chosen at run time, and several
// batch rows blocked against each weight row so that one load of W_j serves them all.
//
// Work is split over units: for unit j, the rows whose estimate selects it are gathered and
// x_i·W_j is computed for them only, kRowBlock rows at a time.
// Every (row, unit) is summed in the same order whichever block it falls in, and by one
// thread, so results do not depend on the batch's composition or on scheduling.
#define EIGEN_USE_THREADS
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "gated_dense.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

constexpr int kRowBlock = 4;
constexpr int64_t kTile = 16;

using DotRowsFn = void (*)(const float* w, const float* const* rows, int64_t n, float* out);

// out[r] = w · rows[r] for r < R: two 8-float accumulators per row, so 2R independent FMA chains.
template <int R>
__attribute__((target("avx2,fma"))) void DotRowsAvx2(const float* w, const float* const* rows,
                                                     int64_t n, float* out) {
  __m256 even[R], odd[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k);
    const __m256 w1 = _mm256_loadu_ps(w + k + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      even[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(rows[r] + k), even[r]);
      odd[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(rows[r] + k + 8), odd[r]);
    }
  }
  if (k + 8 <= n) {
    const __m256 w0 = _mm256_loadu_ps(w + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) even[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(rows[r] + k), even[r]);
    k += 8;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 sum8 = _mm256_add_ps(even[r], odd[r]);
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
    sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
    float total = _mm_cvtss_f32(sum4);
    for (int64_t tail = k; tail < n; ++tail) total += w[tail] * rows[r][tail];
    out[r] = total;
  }
}

// The same contract for x86-64 CPUs without AVX2/FMA (the library's baseline ISA).
template <int R>
void DotRowsPortable(const float* w, const float* const* rows, int64_t n, float* out) {
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t k = 0; k < n; ++k) total += w[k] * rows[r][k];
    out[r] = total;
  }
}

struct DotKernels {
  DotRowsFn block;
  DotRowsFn single;
};

const DotKernels& SelectedDotKernels() {
  static const DotKernels kernels =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
          ? DotKernels{DotRowsAvx2<kRowBlock>, DotRowsAvx2<1>}
          : DotKernels{DotRowsPortable<kRowBlock>, DotRowsPortable<1>};
  return kernels;
}

// Units [begin, end): select rows, and compute only the selected dot products.
int64_t ComputeUnits(const GatedDenseArgs& a, int64_t begin, int64_t end) {
  const DotKernels& dot = SelectedDotKernels();
  std::vector<int64_t> selected;
  selected.reserve(a.batch);
  int64_t computed = 0;
  const float* rows[kRowBlock];
  float dots[kRowBlock];
  for (int64_t j = begin; j < end; ++j) {
    selected.clear();
    for (int64_t i = 0; i < a.batch; ++i) {
      if (UnitIsComputed(a.product[i * a.units + j] + a.bias[j], a.margin)) {
        selected.push_back(i);
      } else {
        a.y[i * a.units + j] = 0.f;
      }
    }
    const float* w = a.kernel + j * a.input_dim;
    const int64_t count = static_cast<int64_t>(selected.size());
    int64_t s = 0;
    for (; s + kRowBlock <= count; s += kRowBlock) {
      for (int r = 0; r < kRowBlock; ++r) rows[r] = a.x + selected[s + r] * a.input_dim;
      dot.block(w, rows, a.input_dim, dots);
      for (int r = 0; r < kRowBlock; ++r) {
        a.y[selected[s + r] * a.units + j] = ReluKeepNan(dots[r] + a.bias[j]);
      }
    }
    for (; s < count; ++s) {
      rows[0] = a.x + selected[s] * a.input_dim;
      dot.single(w, rows, a.input_dim, dots);
      a.y[selected[s] * a.units + j] = ReluKeepNan(dots[0] + a.bias[j]);
    }
    computed += count;
  }
  return computed;
}

// The density of a sample of the estimates: enough to tell the thread pool how much work a
// unit is, so that small jobs stay on one thread (waking another costs tens of microseconds).
double SampledDensity(const float* product, const float* bias, int64_t batch, int64_t units,
                      float margin) {
  const int64_t sample = std::min<int64_t>(batch * units, 4096);
  int64_t selected = 0;
  for (int64_t k = 0; k < sample; ++k) selected += UnitIsComputed(product[k] + bias[k % units], margin);
  return sample ? static_cast<double>(selected) / sample : 0.0;
}

float Fraction(int64_t count, int64_t batch, int64_t units) {
  return static_cast<float>(static_cast<double>(count) / (static_cast<double>(batch) * units));
}

}  // namespace

template <>
void GatedDenseFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const GatedDenseArgs& a) {
  *a.active_fraction = 0.f;
  if (a.batch == 0 || a.units == 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const double density = SampledDensity(a.product, a.bias, a.batch, a.units, a.margin);
  // Cycles per unit: the scan of its estimates, and ~4 multiply-adds a cycle for its rows.
  const int64_t unit_cost = a.batch * (2 + static_cast<int64_t>(density * a.input_dim / 4));
  std::atomic<int64_t> computed{0};
  workers->ParallelFor(a.units, unit_cost, [&](int64_t begin, int64_t end) {
    computed += ComputeUnits(a, begin, end);
  });
  *a.active_fraction = Fraction(computed.load(), a.batch, a.units);
}

template <>
void MaskedReluFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const MaskedReluArgs& a) {
  *a.active_fraction = 0.f;
  if (a.batch == 0 || a.units == 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  std::atomic<int64_t> computed{0};
  // Rows in tiles of kTile so that the transposed reads of z_t stay within a few cache lines.
  const int64_t tiles = (a.batch + kTile - 1) / kTile;
  workers->ParallelFor(tiles, 4 * kTile * a.units, [&](int64_t first_tile, int64_t end_tile) {
    int64_t count = 0;
    const int64_t row_end = std::min(end_tile * kTile, a.batch);
    for (int64_t j0 = 0; j0 < a.units; j0 += kTile) {
      const int64_t unit_end = std::min(j0 + kTile, a.units);
      for (int64_t i = first_tile * kTile; i < row_end; ++i) {
        for (int64_t j = j0; j < unit_end; ++j) {
          const int64_t k = i * a.units + j;
          const bool selected = UnitIsComputed(a.product[k] + a.bias[j], a.margin);
          a.y[k] = selected ? ReluKeepNan(a.z_t[j * a.batch + i] + a.bias[j]) : 0.f;
          count += selected;
        }
      }
    }
    computed += count;
  });
  *a.active_fraction = Fraction(computed.load(), a.batch, a.units);
}

}  // namespace lrc
