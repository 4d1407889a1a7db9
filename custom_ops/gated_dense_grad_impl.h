// The gated backward's vector loops, written once and compiled once per instruction set.
//
// gated_dense_grad_cpu.cc copies this file into each ISA's namespace of isa.h (isa_copies.h),
// where Vec, kWidth, Zero(), Load(p), Store(p, v), StreamStore(p, v), FenceStreamStores(),
//   Broadcast(s), MulAdd(a, b, c) = a * b + c, Prefetch(p)
// are that ISA's, under its `#pragma GCC target`. No include guard: included once per ISA.

// Column chunks: 64 floats (4 AVX-512 or 8 AVX2 vectors), so that a chunk of x for 128 rows
// (32 KiB) stays in L1 and one of W for 4000 units (1 MiB) in L2; 16 floats on scalars.
constexpr int kChunkVectors = (kWidth > 1 ? 64 : 16) / kWidth;

// out[0, columns) = Σ_p grads[p] · table[others[p]][0, V vectors), table's rows `table_stride`
// floats apart: one register of sums a vector, the pairs added in list order. With `stream`, a
// whole aligned chunk is stored past the caches.
template <int V>
void GatherRows(const int32_t* others, const float* grads, int64_t count, const float* table,
                int64_t table_stride, float* out, int64_t columns, bool stream) {
  constexpr int64_t kColumns = V * kWidth;
  Vec sum[V];
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) sum[v] = Zero();
  for (int64_t p = 0; p < count; ++p) {
    const Vec g = Broadcast(grads[p]);
    const float* row = table + others[p] * table_stride;
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) sum[v] = MulAdd(g, Load(row + v * kWidth), sum[v]);
  }
  if (columns == kColumns) {
    const bool aligned = reinterpret_cast<uintptr_t>(out) % sizeof(Vec) == 0;
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      if (stream && aligned) {
        StreamStore(out + v * kWidth, sum[v]);
      } else {
        Store(out + v * kWidth, sum[v]);
      }
    }
  } else {
    float whole[kColumns];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) Store(whole + v * kWidth, sum[v]);
    std::memcpy(out, whole, columns * sizeof(float));
  }
}

// Columns [0, columns) of `rows` rows `stride` floats apart, copied into rows of `packed`
// floats (a multiple of kWidth), zero beyond `columns`. Rows a few ahead are prefetched: they
// are `stride` floats apart, too far for the hardware prefetcher to follow.
inline void PackColumns(const float* source, int64_t rows, int64_t stride, int64_t columns,
                        int64_t packed, float* out) {
  constexpr int64_t kRowsAhead = 4;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = source + r * stride;
    if (r + kRowsAhead < rows) {
      for (int64_t c = 0; c < columns; c += kFloatsPerLine) Prefetch(row + kRowsAhead * stride + c);
    }
    float* to = out + r * packed;
    int64_t c = 0;
    for (; c + kWidth <= columns; c += kWidth) Store(to + c, Load(row + c));
    for (; c < columns; ++c) to[c] = row[c];
    for (; c < packed; ++c) to[c] = 0.f;
  }
}

// For the units of word `word` (units 64·word .. +64): bit u of bitmap[i * words + word] set
// where pair (i, 64·word + u) passes gradient (PairPasses), each unit's count of such pairs in
// unit_counts, and grad_bias, summed in row order.
inline void MarkPairs(const GatedDenseGradArgs& a, int64_t word, int64_t words, uint64_t* bitmap,
                      int64_t* unit_counts) {
  const int64_t unit = word * 64;
  int32_t count[64] = {};
  float sum[64] = {};
  // The counts come from the bits, so that the lists, sized by the counts and filled from the
  // bits, agree whatever PassesGradient says (comparing twice was 1.4x faster here, and one
  // edit away from overrunning a list). A whole word has a fixed trip count: it vectorises.
  auto mark = [&](auto width) {
    for (int64_t i = a.sample_rows; i < a.batch; ++i) {
      const float* y = a.y + i * a.units + unit;
      const float* grad_y = a.grad_y + i * a.units + unit;
      uint64_t bits = 0;
      for (int64_t u = 0; u < width; ++u) bits |= uint64_t{PassesGradient(y[u])} << u;
      for (int64_t u = 0; u < width; ++u) {
        const bool passes = (bits >> u) & 1;
        count[u] += passes;
        sum[u] += passes ? grad_y[u] : 0.f;
      }
      bitmap[i * words + word] = bits;
    }
  };
  const int64_t width = std::min<int64_t>(64, a.units - unit);
  // The sampled rows, where skipped's pairs join y's: few, so one pair at a time.
  for (int64_t i = 0; i < a.sample_rows; ++i) {
    uint64_t bits = 0;
    for (int64_t u = 0; u < width; ++u) {
      const bool passes = PairPasses(a, i, unit + u);
      bits |= uint64_t{passes} << u;
      count[u] += passes;
      sum[u] += passes ? PairGradient(a, i, unit + u) : 0.f;
    }
    bitmap[i * words + word] = bits;
  }
  if (width == 64) {
    mark(std::integral_constant<int64_t, 64>());
  } else {
    mark(width);
  }
  for (int64_t u = 0; u < width; ++u) {
    unit_counts[unit + u] = count[u];
    a.grad_bias[unit + u] = sum[u];
  }
}

// This ISA's loops (GradKernels: gated_dense_grad_cpu.cc).
inline GradKernels MakeGradKernels() {
  constexpr int v = kChunkVectors;
  constexpr int v2 = v / 2 > 0 ? v / 2 : 1, v4 = v / 4 > 0 ? v / 4 : 1, v8 = v / 8 > 0 ? v / 8 : 1;
  return {kWidth,
          {v, v2, v4, v8},
          {GatherRows<v>, GatherRows<v2>, GatherRows<v4>, GatherRows<v8>},
          PackColumns,
          MarkPairs,
          FenceStreamStores};
}
