// fp32 dot products on the CPU, one and eight at a time, with an AVX2/FMA path chosen at run time and a
// portable one (LORA_EXT_DISABLE_SIMD=1): the mixed-batch per-row kernel (multi_cpu.cpp).
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace lora_ext {
namespace cpu_dot {

inline float dot_portable(const float* a, const float* b, int64_t n) {
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int c = 0; c < 4; ++c) s[c] += a[k + c] * b[k + c];
  for (; k < n; ++k) s[0] += a[k] * b[k];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// out[l] = T . B[l * r ..] for the 8 rows of B from B (each r long).
inline void dot8_portable(const float* T, const float* B, int64_t r, float out[8]) {
  for (int l = 0; l < 8; ++l) out[l] = dot_portable(T, B + l * r, r);
}

#if defined(LORA_EXT_X86_SIMD)
__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
  const __m256 s = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float out = _mm_cvtss_f32(h);
  for (; k < n; ++k) out += a[k] * b[k];
  return out;
}

// The 8 dots at once: eight accumulators over r, then one reduction tree for all eight (hadd and a
// lane swap) instead of eight horizontal sums.
__attribute__((target("avx2,fma"))) inline void dot8_avx2(const float* T, const float* B, int64_t r, float out[8]) {
  __m256 acc[8];
  for (int l = 0; l < 8; ++l) acc[l] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) {
    const __m256 t = _mm256_loadu_ps(T + j);
    for (int l = 0; l < 8; ++l) acc[l] = _mm256_fmadd_ps(t, _mm256_loadu_ps(B + l * r + j), acc[l]);
  }
  const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: s0123 = [0 1 2 3 | 0 1 2 3] halves, s4567 likewise: add the 128-bit halves across
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
  for (; j < r; ++j)
    for (int l = 0; l < 8; ++l) out[l] += T[j] * B[l * r + j];
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(LORA_EXT_X86_SIMD)
  if (x86_fma_enabled()) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

inline void dot8(const float* T, const float* B, int64_t r, float out[8]) {
#if defined(LORA_EXT_X86_SIMD)
  if (x86_fma_enabled()) return dot8_avx2(T, B, r, out);
#endif
  dot8_portable(T, B, r, out);
}

}  // namespace cpu_dot
}  // namespace lora_ext
