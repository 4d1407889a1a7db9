// Includes the file named by LRC_ISA_COPY (a quoted file name the includer defines) once in each
// of namespaces avx512, avx2 and portable, each copy under that instruction set's
// `#pragma GCC target` and with one of LRC_ISA_AVX512, LRC_ISA_AVX2 or LRC_ISA_PORTABLE defined
// while it is read. So a loop is written once against isa.h's primitives and each copy runs only
// where __builtin_cpu_supports says the CPU has its instructions; the library itself is built for
// baseline x86-64. Included at namespace lrc's scope.
//
// No include guard: included once per file that needs copies (isa.h for the primitives,
// gated_dense_cpu.cc and gated_dense_grad_cpu.cc for their loops).
#ifndef LRC_ISA_COPY
#error "define LRC_ISA_COPY as the file to copy per instruction set before including isa_copies.h"
#endif

#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
// GCC 12's own _mm512_reduce_add_ps trips -Wuninitialized (an _mm256_undefined_ps inside).
#pragma GCC diagnostic ignored "-Wuninitialized"
#define LRC_ISA_AVX512
namespace avx512 {
#include LRC_ISA_COPY
}  // namespace avx512
#undef LRC_ISA_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LRC_ISA_AVX2
namespace avx2 {
#include LRC_ISA_COPY
}  // namespace avx2
#undef LRC_ISA_AVX2
#pragma GCC pop_options

// x86-64 baseline: the same loops on scalars.
#define LRC_ISA_PORTABLE
namespace portable {
#include LRC_ISA_COPY
}  // namespace portable
#undef LRC_ISA_PORTABLE

#undef LRC_ISA_COPY
