// The gated backward's inner loops, written once and compiled once per instruction set.
//
// gated_dense_grad_cpu.cc includes this file inside each ISA's namespace of isa.h, which defines
//   Vec, kWidth, Zero(), Load(p), Store(p, v), Broadcast(s), MulAdd(a, b, c) = a * b + c,
//   Prefetch(p)
// under a `#pragma GCC target` for that ISA. No include guard: included once per ISA.
//
// Both backward products of one owner's pairs over one column chunk, in one pass. The owner is a
// unit j (held = W_j, its pairs' others are rows i, other = x, other_grad = grad_x) or a row i
// (held = x_i, others are units, other = W, other_grad = grad_kernel); g is grad_y of the pair:
//   held_grad        = Σ_p g_p · other[o_p]     accumulated in registers, stored once
//   other_grad[o_p] += g_p · held               read, added to and written back, pair by pair
// `held`, `held_grad`, `other` and `other_grad` point at the chunk's first column; rows of
// `other` and `other_grad` are `stride` floats apart. Pairs are added in list order, so each
// element's sum has the same order whatever the chunking.

// A chunk of V vectors. `ahead` is the next owner's `held` chunk, prefetched line by line: owners
// are rows of W (or x) `stride` floats apart, too far for the hardware prefetcher to follow.
template <int V>
void PairChunk(const float* held, const int32_t* others, const float* grads, int64_t count,
               const float* other, float* other_grad, int64_t stride, float* held_grad,
               const float* ahead) {
  for (int64_t line = 0; line < V * kWidth; line += kFloatsPerLine) Prefetch(ahead + line);
  Vec h[V], sum[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    h[v] = Load(held + v * kWidth);
    sum[v] = Zero();
  }
  for (int64_t p = 0; p < count; ++p) {
    const Vec g = Broadcast(grads[p]);
    const int64_t offset = others[p] * stride;
    const float* o = other + offset;
    float* o_grad = other_grad + offset;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      sum[v] = MulAdd(g, Load(o + v * kWidth), sum[v]);
      Store(o_grad + v * kWidth, MulAdd(g, h[v], Load(o_grad + v * kWidth)));
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) Store(held_grad + v * kWidth, sum[v]);
}

// The last `columns` (< kWidth) columns of the matrix, one at a time.
inline void PairColumns(const float* held, const int32_t* others, const float* grads, int64_t count,
                        const float* other, float* other_grad, int64_t stride, float* held_grad,
                        int64_t columns) {
  for (int64_t c = 0; c < columns; ++c) {
    float sum = 0.f;
    for (int64_t p = 0; p < count; ++p) {
      const int64_t offset = others[p] * stride + c;
      sum += grads[p] * other[offset];
      other_grad[offset] += grads[p] * held[c];
    }
    held_grad[c] = sum;
  }
}
