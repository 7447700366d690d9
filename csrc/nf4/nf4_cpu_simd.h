// x86 SIMD for the CPU dequantizer: a packed byte holds two 4-bit table indices, so expanding a
// block is a 16-entry table lookup, which pshufb does 16 at a time. at::vec has no byte shuffle,
// and without it the lookup runs at ~6 instructions an element. Chosen at run time (cpuid), with
// the portable loop in nf4_cpu.cpp as the fallback; LORA_EXT_DISABLE_SIMD=1 forces the fallback.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/cpu_features.h"
#include "common/cpu_simd16.h"
#include "nf4/nf4_common.h"

namespace lora_ext {
namespace nf4 {
namespace simd {

#if defined(LORA_EXT_X86_SIMD)

// Byte planes of the 16-entry output table: plane k holds byte k of each entry, for pshufb.
template <int kBytes>
struct Planes {
  __m128i p[kBytes];
};

// code * scale for the 16 codes, rounded to T, as byte planes. The products are the scalar path's
// (one IEEE multiply each); float16 rounds with F16C and bfloat16 with c10's integer
// round-to-nearest-even, so every entry equals static_cast<T>(code * scale).
template <typename T>
__attribute__((target("avx2,f16c"))) inline Planes<sizeof(T)> table_planes(float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 f0 = _mm256_mul_ps(_mm256_setr_ps(code_value(0), code_value(1), code_value(2), code_value(3),
                                                 code_value(4), code_value(5), code_value(6), code_value(7)), s);
  const __m256 f1 = _mm256_mul_ps(_mm256_setr_ps(code_value(8), code_value(9), code_value(10), code_value(11),
                                                 code_value(12), code_value(13), code_value(14), code_value(15)), s);
  Planes<sizeof(T)> out;
  if constexpr (sizeof(T) == 4) {
    // Per 128-bit lane group byte k of its 4 entries, then gather the lanes: dwords = plane-major.
    const __m256i by_byte = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                             0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i a = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(f0), by_byte), order);
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(f1), by_byte), order);
    const __m128i a0 = _mm256_castsi256_si128(a), a1 = _mm256_extracti128_si256(a, 1);
    const __m128i b0 = _mm256_castsi256_si128(b), b1 = _mm256_extracti128_si256(b, 1);
    out.p[0] = _mm_unpacklo_epi64(a0, b0);
    out.p[1] = _mm_unpackhi_epi64(a0, b0);
    out.p[2] = _mm_unpacklo_epi64(a1, b1);
    out.p[3] = _mm_unpackhi_epi64(a1, b1);
  } else {
    __m128i h0, h1;  // entries 0..7 and 8..15 as 16-bit values
    if constexpr (std::is_same_v<T, c10::Half>) {
      h0 = _mm256_cvtps_ph(f0, _MM_FROUND_TO_NEAREST_INT);
      h1 = _mm256_cvtps_ph(f1, _MM_FROUND_TO_NEAREST_INT);
    } else {
      h0 = simd16::bf16_rne8(f0);
      h1 = simd16::bf16_rne8(f1);
    }
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m128i s0 = _mm_shuffle_epi8(h0, split), s1 = _mm_shuffle_epi8(h1, split);
    out.p[0] = _mm_unpacklo_epi64(s0, s1);
    out.p[1] = _mm_unpackhi_epi64(s0, s1);
  }
  return out;
}

// Expands whole groups of 16 packed bytes (32 outputs); returns how many bytes it consumed.
template <typename T>
__attribute__((target("avx2"))) inline int64_t expand(const uint8_t* src, int64_t nbytes, const Planes<sizeof(T)>& t,
                                                      T* dst) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16- or 32-bit outputs");
  const __m128i low4 = _mm_set1_epi8(0x0f);
  int64_t j = 0;
  for (; j + 16 <= nbytes; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);  // element 2k
    const __m128i lo = _mm_and_si128(b, low4);                     // element 2k + 1
    const __m128i idx[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};  // elements in order
    __m128i* out = reinterpret_cast<__m128i*>(dst + 2 * j);
    for (int h = 0; h < 2; ++h) {
      if constexpr (sizeof(T) == 2) {
        const __m128i b0 = _mm_shuffle_epi8(t.p[0], idx[h]);
        const __m128i b1 = _mm_shuffle_epi8(t.p[1], idx[h]);
        _mm_storeu_si128(out + 2 * h, _mm_unpacklo_epi8(b0, b1));
        _mm_storeu_si128(out + 2 * h + 1, _mm_unpackhi_epi8(b0, b1));
      } else {
        const __m128i b0 = _mm_shuffle_epi8(t.p[0], idx[h]);
        const __m128i b1 = _mm_shuffle_epi8(t.p[1], idx[h]);
        const __m128i b2 = _mm_shuffle_epi8(t.p[2], idx[h]);
        const __m128i b3 = _mm_shuffle_epi8(t.p[3], idx[h]);
        const __m128i w01l = _mm_unpacklo_epi8(b0, b1), w01h = _mm_unpackhi_epi8(b0, b1);
        const __m128i w23l = _mm_unpacklo_epi8(b2, b3), w23h = _mm_unpackhi_epi8(b2, b3);
        _mm_storeu_si128(out + 4 * h, _mm_unpacklo_epi16(w01l, w23l));
        _mm_storeu_si128(out + 4 * h + 1, _mm_unpackhi_epi16(w01l, w23l));
        _mm_storeu_si128(out + 4 * h + 2, _mm_unpacklo_epi16(w01h, w23h));
        _mm_storeu_si128(out + 4 * h + 3, _mm_unpackhi_epi16(w01h, w23h));
      }
    }
  }
  return j;
}

// Blocks [b0, b1): one table per block, full 16-byte groups vectorized, the rest element-wise.
template <typename T, typename ScaleOf>
__attribute__((target("avx2,f16c"))) void dequantize_range(const uint8_t* packed, ScaleOf scale_of, int64_t b0,
                                                           int64_t b1, int64_t blocksize, int64_t n, T* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const float scale = scale_of(b);
    const Planes<sizeof(T)> t = table_planes<T>(scale);
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const uint8_t* src = packed + start / 2;
    T* dst = out + start;
    const int64_t pairs = len / 2;
    const int64_t done = expand<T>(src, pairs, t, dst);
    if (done * 2 < len) {
      T table[16];
      for (uint32_t c = 0; c < 16; ++c) table[c] = static_cast<T>(mul_rn(code_value(c), scale));
      for (int64_t j = done; j < pairs; ++j) {
        dst[2 * j] = table[src[j] >> 4];
        dst[2 * j + 1] = table[src[j] & 15];
      }
      if (len & 1) dst[len - 1] = table[src[pairs] >> 4];
    }
  }
}

#endif

}  // namespace simd
}  // namespace nf4
}  // namespace lora_ext
