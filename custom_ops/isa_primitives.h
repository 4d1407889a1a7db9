// One instruction set's vector primitives, the vocabulary of the loops in dot_rows_impl.h and
// gated_dense_grad_impl.h: Vec, kWidth (floats a Vec), Zero(), Load(p), Store(p, v),
// StreamStore(p, v), FenceStreamStores(), Broadcast(s), MulAdd(a, b, c) = a * b + c, Sum(v),
// Prefetch(p), and LoadFirst(p, count) / StoreFirst(p, v, count), which read or write only the
// first count <= kWidth floats (the rest read as 0; masked off, they never fault). GCC's vector extensions make `+` work on Vec for all three sets.
//
// No include guard: isa.h includes it once per instruction set through isa_copies.h, which
// defines the LRC_ISA_* macro of the copy being read.
#if defined(LRC_ISA_AVX512) || defined(LRC_ISA_AVX2)
// The AVX-512 and AVX2 intrinsics used here differ only in their prefix, LRC_MM's.
#if defined(LRC_ISA_AVX512)
using Vec = __m512;
#define LRC_MM(name) _mm512_##name
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
#define LRC_MM(name) _mm256_##name
inline float Sum(Vec v) {
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum4, _mm_movehdup_ps(sum4)));
}
#endif
constexpr int64_t kWidth = sizeof(Vec) / sizeof(float);
inline Vec Zero() { return LRC_MM(setzero_ps)(); }
inline Vec Load(const float* p) { return LRC_MM(loadu_ps)(p); }
inline void Store(float* p, Vec v) { LRC_MM(storeu_ps)(p, v); }
// Past the caches, for output nothing reads soon; p aligned to the vector. FenceStreamStores()
// orders them before the thread's later stores.
inline void StreamStore(float* p, Vec v) { LRC_MM(stream_ps)(p, v); }
inline void FenceStreamStores() { _mm_sfence(); }
inline Vec Broadcast(float value) { return LRC_MM(set1_ps)(value); }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return LRC_MM(fmadd_ps)(a, b, c); }
inline void Prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
#undef LRC_MM
#if defined(LRC_ISA_AVX512)
inline __mmask16 FirstLanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
inline Vec LoadFirst(const float* p, int64_t count) { return _mm512_maskz_loadu_ps(FirstLanes(count), p); }
inline void StoreFirst(float* p, Vec v, int64_t count) { _mm512_mask_storeu_ps(p, FirstLanes(count), v); }
#else
inline __m256i FirstLanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec LoadFirst(const float* p, int64_t count) { return _mm256_maskload_ps(p, FirstLanes(count)); }
inline void StoreFirst(float* p, Vec v, int64_t count) { _mm256_maskstore_ps(p, FirstLanes(count), v); }
#endif
#elif defined(LRC_ISA_PORTABLE)
using Vec = float;
constexpr int64_t kWidth = 1;
inline Vec Zero() { return 0.f; }
inline Vec Load(const float* p) { return *p; }
inline void Store(float* p, Vec v) { *p = v; }
inline void StreamStore(float* p, Vec v) { *p = v; }
inline void FenceStreamStores() {}
inline Vec Broadcast(float value) { return value; }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return a * b + c; }
inline float Sum(Vec v) { return v; }
inline void Prefetch(const float*) {}
inline Vec LoadFirst(const float* p, int64_t count) { return count > 0 ? *p : 0.f; }
inline void StoreFirst(float* p, Vec v, int64_t count) {
  if (count > 0) *p = v;
}
#else
#error "isa_primitives.h is included through isa_copies.h"
#endif
