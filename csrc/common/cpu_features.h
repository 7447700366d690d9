// Run-time choice of the CPU kernels' x86 SIMD paths (AVX2 + F16C), shared by every CPU file that
// has one. LORA_EXT_DISABLE_SIMD=1 forces the portable loops (tests compare the two).
#pragma once

#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LORA_EXT_X86_SIMD 1
#endif

namespace lora_ext {

inline bool x86_simd_enabled() {
  static const bool on = [] {
    const char* off = std::getenv("LORA_EXT_DISABLE_SIMD");
    if (off != nullptr && off[0] == '1') return false;
#if defined(LORA_EXT_X86_SIMD)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return on;
}

}  // namespace lora_ext
