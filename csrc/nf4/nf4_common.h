// NF4 and 8-bit dynamic-map math shared by the CPU and CUDA kernels, bit-compatible with
// bitsandbytes' CPU backend (the oracle in tests/test_nf4.py). Every rule here is mirrored in
// lora_ext/reference.py; a change must change both.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace lora_ext {
namespace nf4 {

constexpr int kMinBlocksize = 32;
constexpr int kMaxBlocksize = 4096;
constexpr int kPadCode = 7;  // an odd element count pads the last low nibble with the code of 0.0

// bitsandbytes' NF4 code book, index 0..15.
LORA_HD float code_value(uint32_t c) {
  switch (c & 15u) {
    case 0: return -0x1p+0f;
    case 1: return -0x1.647362p-1f;
    case 2: return -0x1.0cd66p-1f;
    case 3: return -0x1.94654p-2f;
    case 4: return -0x1.23449ap-2f;
    case 5: return -0x1.7a6a7ep-3f;
    case 6: return -0x1.74f0e2p-4f;
    case 7: return 0.0f;
    case 8: return 0x1.45f5fep-4f;
    case 9: return 0x1.4995c6p-3f;
    case 10: return 0x1.f809bap-3f;
    case 11: return 0x1.5a0674p-2f;
    case 12: return 0x1.c3497p-2f;
    case 13: return 0x1.200f56p-1f;
    case 14: return 0x1.722766p-1f;
    default: return 0x1p+0f;
  }
}

// fp32 midpoint between code k and k+1, (c[k] + c[k+1]) / 2 exactly as bitsandbytes computes it.
LORA_HD float midpoint(int k) {
  switch (k) {
    case 0: return -0x1.b239bp-1f;
    case 1: return -0x1.38a4ep-1f;
    case 2: return -0x1.d709p-2f;
    case 3: return -0x1.5bd4ecp-2f;
    case 4: return -0x1.e079d8p-3f;
    case 5: return -0x1.1a7178p-3f;
    case 6: return -0x1.74f0e2p-5f;
    case 7: return 0x1.45f5fep-5f;
    case 8: return 0x1.ec90c4p-4f;
    case 9: return 0x1.a0cfcp-3f;
    case 10: return 0x1.2b05a8p-2f;
    case 11: return 0x1.8ea7f2p-2f;
    case 12: return 0x1.00da08p-1f;
    case 13: return 0x1.491b5ep-1f;
    default: return 0x1.b913b4p-1f;
  }
}

// Nearest code of a scaled value: the number of midpoints strictly below it, so a value exactly
// on a midpoint takes the lower code (torch.bucketize, right=False); NaN compares false against all
// and takes code 15, as there. Branch-free against constants, so it vectorizes on the CPU.
LORA_HD uint32_t encode(float s) {
  uint32_t c = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 15; ++k) c += !(s <= midpoint(k));
  return c;
}

// absmax of a 4-bit block: NaN propagates (torch.max), so a block holding NaN decodes to NaN.
// Reductions end with canonical_nan so every device stores the same bits.
LORA_HD float absmax_step(float m, float x) {
  const float a = x < 0.0f ? -x : x;
  if (is_nan(m) || is_nan(a)) return is_nan(m) ? m : a;
  return a > m ? a : m;
}

LORA_HD float canonical_nan(float x) {
  if (!is_nan(x)) return x;
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return __builtin_nanf("");
#endif
}

// Subnormal on purpose (bitsandbytes' clamp): flushing it to zero (fast math, FTZ) would divide an
// all-zero trailing block by 0.
// The multiplier a full block is scaled by: 1 / max(absmax, 1e-38) (torch: x * (1/absmax)).
// The trailing partial block is divided by max(absmax, 1e-38) instead, and that clamped value
// is what is stored for it. Both as bitsandbytes' CPU path does.
constexpr float kTinyAbsmax = 1e-38f;
LORA_HD float clamp_tiny(float am) { return (am < kTinyAbsmax) ? kTinyAbsmax : am; }  // NaN stays NaN

// ---- 8-bit signed dynamic map (double quantization of absmax) ----
// bitsandbytes' CPU quantize_blockwise maps x/absmax onto a 65536-step grid over [-1, 1] and then
// to the code nearest that grid point. We compute the grid point's code directly.
constexpr int kDynCodes = 256;
constexpr int kDynGrid = 65536;

// The 255 midpoints of a sorted 256-entry map, 0.5 * (c[k] + c[k+1]) as bitsandbytes builds its grid.
LORA_HD void dyn_midpoints(const float* code, float* mids) {
  for (int k = 0; k < kDynCodes - 1; ++k) mids[k] = mul_rn(0.5f, add_rn(code[k], code[k + 1]));
}

// absmax of an 8-bit block: NaN ignored, starts at 0 (bitsandbytes' CPU kernel).
LORA_HD float dyn_absmax_step(float m, float x) {
  const float a = x < 0.0f ? -x : x;
  return a > m ? a : m;
}

LORA_HD uint32_t dyn_encode(float x, float inv_absmax, const float* mids) {
  float v = mul_rn(x, inv_absmax);
  if (!(v >= -1.0f)) v = -1.0f;  // NaN -> -1, like the AVX2 max(v, -1) there
  if (v > 1.0f) v = 1.0f;
  float t = add_rn(v, 1.0f);
  t = mul_rn(t, 0.5f);
  t = mul_rn(t, static_cast<float>(kDynGrid - 1));
  t = add_rn(t, 0.5f);
  const int grid = static_cast<int>(t);  // truncation, t in [0.5, 65535.5]
  const float g = add_rn(-1.0f, div_rn(2.0f * static_cast<float>(grid), static_cast<float>(kDynGrid - 1)));
  int lo = 0, hi = kDynCodes - 1;  // count of midpoints strictly below g
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (mids[mid] < g) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint32_t>(lo);
}

// Decoded absmax of 4-bit block b under double quantization: code8[q] * nested_absmax + offset,
// multiply and add rounded separately (bitsandbytes dequantizes, then adds the offset).
LORA_HD float nested_absmax(uint8_t q, float nested, float offset, const float* code8) {
  return add_rn(mul_rn(code8[q], nested), offset);
}

// Where block b's absmax comes from: plain float32, or decoded from the double-quantized form.
struct BlockScales {
  const float* absmax = nullptr;   // plain
  const uint8_t* qabsmax = nullptr;  // double-quantized: these four
  const float* nested = nullptr;
  const float* code8 = nullptr;
  float offset = 0.0f;
  int nested_log2 = 8;

  LORA_HD float operator()(int64_t b) const {
    return qabsmax != nullptr ? nested_absmax(qabsmax[b], nested[b >> nested_log2], offset, code8) : absmax[b];
  }
};

}  // namespace nf4
}  // namespace lora_ext
