// The instruction sets the CPU kernels are compiled for: each one's vector primitives, and the
// choice of one at run time, shared by the forward (gated_dense_cpu.cc) and the backward
// (gated_dense_grad_cpu.cc).
//
// A kernel loop is written once against the primitives (isa_primitives.h) and copied into
// namespaces avx512, avx2 and portable by isa_copies.h, each copy under its instruction set's
// `#pragma GCC target`, so that each copy runs only where __builtin_cpu_supports says the CPU
// has it (SelectedIsa below); the library itself is built for baseline x86-64.
#ifndef LRC_KERAS_CUSTOM_OPS_ISA_H_
#define LRC_KERAS_CUSTOM_OPS_ISA_H_

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace lrc {

// Vec, kWidth and the primitives of each instruction set, in namespaces avx512, avx2, portable.
#define LRC_ISA_COPY "isa_primitives.h"
#include "isa_copies.h"

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
