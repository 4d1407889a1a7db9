// The instruction sets the CPU kernels are compiled for: each one's vector primitives, and the
// choice of one at run time, shared by the forward (gated_dense_cpu.cc) and the backward
// (gated_dense_grad_cpu.cc).
//
// A kernel loop is written once against the primitives (dot_rows_impl.h, pair_axpy_impl.h) and
// included inside namespace avx512, avx2 and portable under that namespace's
// `#pragma GCC target`, so that each copy runs only where __builtin_cpu_supports says the CPU
// has it; the library itself is built for baseline x86-64. GCC's vector extensions make `+`
// work on Vec for all three.
#ifndef LRC_KERAS_CUSTOM_OPS_ISA_H_
#define LRC_KERAS_CUSTOM_OPS_ISA_H_

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace lrc {

#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
// GCC 12's own _mm512_reduce_add_ps trips -Wuninitialized (an _mm256_undefined_ps inside).
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512 {
using Vec = __m512;
constexpr int64_t kWidth = 16;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// Past the caches, for output nothing reads soon; p aligned to the vector. FenceStreamStores()
// orders them before the thread's later stores.
inline void StreamStore(float* p, Vec v) { _mm512_stream_ps(p, v); }
inline void FenceStreamStores() { _mm_sfence(); }
inline Vec Broadcast(float value) { return _mm512_set1_ps(value); }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline void Prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using Vec = __m256;
constexpr int64_t kWidth = 8;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline void StreamStore(float* p, Vec v) { _mm256_stream_ps(p, v); }
inline void FenceStreamStores() { _mm_sfence(); }
inline Vec Broadcast(float value) { return _mm256_set1_ps(value); }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float Sum(Vec v) {
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum4, _mm_movehdup_ps(sum4)));
}
inline void Prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
}  // namespace avx2
#pragma GCC pop_options

// x86-64 baseline: the same loops on scalars.
namespace portable {
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
}  // namespace portable

enum class Isa { kAvx512, kAvx2, kPortable };

// The widest instruction set the CPU has; LRC_ISA=avx2|portable caps it (tests run every copy).
inline Isa ChooseIsa() {
  const char* cap = std::getenv("LRC_ISA");
  const std::string limit = cap ? cap : "";
  if (limit.empty() && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (limit != "portable" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
  return Isa::kPortable;
}

// Chosen once per process, for every op.
inline Isa SelectedIsa() {
  static const Isa isa = ChooseIsa();
  return isa;
}

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_ISA_H_
