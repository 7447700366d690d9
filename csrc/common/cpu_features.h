// Run-time choice of the CPU kernels' x86 SIMD paths (AVX2 + F16C), shared by every CPU file that
// has one. LORA_EXT_DISABLE_SIMD=1 forces the portable loops (tests compare the two).
#pragma once

#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
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

// AVX2 + F16C + FMA: the paths of the CPU kernels that multiply-add (cpu_dot.h, lora_gemm_cpu.cpp).
inline bool x86_fma_enabled() {
#if defined(LORA_EXT_X86_SIMD)
  static const bool on = x86_simd_enabled() && __builtin_cpu_supports("fma");
  return on;
#else
  return false;
#endif
}

// CPUID leaf 7 (sub-leaf `sub`) register `reg` (0: EAX, 3: EDX) has `bit`, and the OS saves the AVX-512
// state (XCR0 opmask, ZMM_Hi256, Hi16_ZMM and the SSE/AVX bits). Plain cpuid, not __builtin_cpu_supports,
// whose feature names depend on the compiler's version. false off x86.
inline bool avx512_feature(unsigned sub, int reg, unsigned bit) {
#if defined(LORA_EXT_X86_SIMD)
  unsigned r[4] = {0, 0, 0, 0};
  if (!__get_cpuid(1, &r[0], &r[1], &r[2], &r[3]) || !(r[2] & bit_OSXSAVE)) return false;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));  // (_xgetbv needs -mxsave)
  if ((xcr0_lo & 0xe6) != 0xe6) return false;
  if (!__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3])) return false;
  return (r[reg] >> bit) & 1u;
#else
  (void)sub, (void)reg, (void)bit;
  return false;
#endif
}

// Native 16-bit dot-product instructions, which torch's CPU GEMM (oneDNN) uses for bf16 and fp16
// matrices: AVX512-BF16 (CPUID.(7,1).EAX[5]) and AVX512-FP16 (CPUID.(7,0).EDX[23]). CPUs with AMX have these
// too.
inline bool cpu_has_avx512_bf16() {
  static const bool on = avx512_feature(1, 0, 5);
  return on;
}

inline bool cpu_has_avx512_fp16() {
  static const bool on = avx512_feature(0, 3, 23);
  return on;
}

}  // namespace lora_ext
