// The estimate's two thin products, (x·U) then ·V, written once and compiled once per instruction
// set: gated_layer_cpu.cc copies this file into each ISA's namespace of isa.h (isa_copies.h),
// where Vec, kWidth, Zero(), Broadcast(s), MulAdd(a, b, c), Load(p), Store(p, v), LoadFirst(p, n)
// and StoreFirst(p, v, n) are that ISA's. No include guard: included once per ISA.
//
// Both products are c = a·b with b row-major and thin on one side (U has `rank` columns, the
// projection `rank` rows), so no packing: a panel of b's columns (two vectors wide) is read
// row by row from the caches and serves kRowBlock rows of a at once, each of the rows' sums in
// registers (8 × 2 of AVX-512's 32, 4 × 2 of AVX2's 16), each a broadcast of a[r][k] times the
// panel's row k. Each element is summed by one thread: the results do not depend on scheduling.

constexpr int kPanelVectors = 2;
constexpr int64_t kPanelColumns = kPanelVectors * kWidth;
constexpr int kRowBlock = kWidth >= 16 ? 8 : 4;

// c[r][0, columns) = Σ_k a[r][k] · b[k][0, columns) for r < R, columns <= kPanelColumns; rows of
// a, b and c are lda, ldb and ldc floats apart.
template <int R, bool kWholePanel>
void MultiplyPanel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c,
                   int64_t ldc, int64_t columns) {
  // A row alone would be one chain of dependent multiply-adds, waiting on each one's latency: it
  // keeps kChains partial sums (k mod kChains) instead, added at the end. So a row's rounding
  // depends on whether it was computed alone, as a GEMM's does on its blocking.
  constexpr int kChains = R == 1 ? 4 : 1;
  // A narrow panel's vectors read only its columns (masked: never past the row's end).
  const int64_t first = kWholePanel ? kWidth : std::min<int64_t>(columns, kWidth);
  const int64_t second = kWholePanel ? kWidth : columns - first;
  const auto load = [&](const float* row, int v) {
    return kWholePanel ? Load(row + v * kWidth) : LoadFirst(row + v * kWidth, v == 0 ? first : second);
  };
  Vec sum[R * kChains][kPanelVectors];
#pragma GCC unroll 8
  for (int s = 0; s < R * kChains; ++s) sum[s][0] = sum[s][1] = Zero();
  int64_t k = 0;
  for (; k + kChains <= depth; k += kChains) {
#pragma GCC unroll 4
    for (int chain = 0; chain < kChains; ++chain) {
      const float* row = b + (k + chain) * ldb;
      const Vec b0 = load(row, 0), b1 = load(row, 1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec ar = Broadcast(a[r * lda + k + chain]);
        sum[r * kChains + chain][0] = MulAdd(ar, b0, sum[r * kChains + chain][0]);
        sum[r * kChains + chain][1] = MulAdd(ar, b1, sum[r * kChains + chain][1]);
      }
    }
  }
  for (; k < depth; ++k) {
    const float* row = b + k * ldb;
    const Vec b0 = load(row, 0), b1 = load(row, 1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec ar = Broadcast(a[r * lda + k]);
      sum[r * kChains][0] = MulAdd(ar, b0, sum[r * kChains][0]);
      sum[r * kChains][1] = MulAdd(ar, b1, sum[r * kChains][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    for (int chain = 1; chain < kChains; ++chain) {
      sum[r * kChains][0] = sum[r * kChains][0] + sum[r * kChains + chain][0];
      sum[r * kChains][1] = sum[r * kChains][1] + sum[r * kChains + chain][1];
    }
    if (kWholePanel) {
      Store(c + r * ldc, sum[r * kChains][0]);
      Store(c + r * ldc + kWidth, sum[r * kChains][1]);
    } else {
      StoreFirst(c + r * ldc, sum[r * kChains][0], first);
      StoreFirst(c + r * ldc + kWidth, sum[r * kChains][1], second);
    }
  }
}

// Rows [0, rows) (at most kRowBlock) of c's panel of `columns` columns: a whole block at once,
// a shorter one row by row.
inline void MultiplyBlock(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                          float* c, int64_t ldc, int64_t rows, int64_t columns) {
  const bool whole = columns == kPanelColumns;
  if (rows == kRowBlock) {
    (whole ? MultiplyPanel<kRowBlock, true> : MultiplyPanel<kRowBlock, false>)(a, lda, b, ldb, depth,
                                                                               c, ldc, columns);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    (whole ? MultiplyPanel<1, true> : MultiplyPanel<1, false>)(a + r * lda, lda, b, ldb, depth,
                                                               c + r * ldc, ldc, columns);
  }
}

// This ISA's loops (LowRankKernels: gated_layer_cpu.cc).
inline LowRankKernels MakeLowRankKernels() { return {kRowBlock, kPanelColumns, MultiplyBlock}; }
