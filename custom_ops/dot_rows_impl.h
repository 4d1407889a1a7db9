// The gated kernel's inner loop, written once and compiled once per instruction set.
//
// gated_dense_cpu.cc copies this file into each ISA's namespace of isa.h (isa_copies.h), where
//   Vec, kWidth, Zero(), Load(p), MulAdd(a, b, c) = a * b + c, Sum(v), Prefetch(p)
// are that ISA's, under its `#pragma GCC target`, so each copy runs only where
// __builtin_cpu_supports says the CPU has it. No include guard: included once per ISA.

// out[r] = w · rows[r] for r < R. Two accumulators per row give 2R independent chains; every
// row is summed in the same order whatever R is, so a result does not depend on its block.
// `ahead` (the next weight row to be used) is prefetched, every cache line of it: selected rows
// come with gaps, so the hardware prefetcher would restart at every one.
template <int R>
void DotRows(const float* w, const float* const* rows, int64_t n, const float* ahead,
             float* out) {
  Vec even[R], odd[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) even[r] = odd[r] = Zero();
  int64_t k = 0;
  for (; k + 2 * kWidth <= n; k += 2 * kWidth) {
    for (int64_t line = 0; line < 2 * kWidth; line += kFloatsPerLine) Prefetch(ahead + line + k);
    const Vec w0 = Load(w + k);
    const Vec w1 = Load(w + k + kWidth);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      even[r] = MulAdd(w0, Load(rows[r] + k), even[r]);
      odd[r] = MulAdd(w1, Load(rows[r] + k + kWidth), odd[r]);
    }
  }
  if (k + kWidth <= n) {
    const Vec w0 = Load(w + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) even[r] = MulAdd(w0, Load(rows[r] + k), even[r]);
    k += kWidth;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float total = Sum(even[r] + odd[r]);
    for (int64_t tail = k; tail < n; ++tail) total += w[tail] * rows[r][tail];
    out[r] = total;
  }
}
