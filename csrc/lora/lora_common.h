// Per-element LoRA dropout math shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd.h"
#include "common/philox.h"

namespace lora_ext {
namespace lora {

struct DropoutSpec {
  uint64_t seed;
  uint64_t keep_threshold;  // round((1 - p) * 2^32): element kept when its Philox draw is below it
  float inv_keep;           // 1 / (1 - p)
};

inline DropoutSpec dropout_spec(double p, uint64_t seed) {
  const double keep = 1.0 - p;
  return {seed, static_cast<uint64_t>(std::llround(keep * 4294967296.0)), static_cast<float>(1.0 / keep)};
}

// The dropped value of v given its Philox word (element e's is dropout_draw(e, seed), drawn once for
// an aligned group of four): v / (1 - p) (one fp32 rounding) if kept, else 0. dropout(x)[e] is this
// of x[e]; its gradient applies the same to dy[e].
LORA_HD float dropout_with_draw(float v, uint32_t draw, const DropoutSpec& d) {
  return static_cast<uint64_t>(draw) < d.keep_threshold ? mul_rn(v, d.inv_keep) : 0.0f;
}

// DoRA's output column j: v * g_j + bias_j (either may be absent), each step rounded on its own.
LORA_HD float column_epilogue(float v, const float* scale, const float* bias, int64_t j) {
  if (scale != nullptr) v = mul_rn(v, scale[j]);
  return bias != nullptr ? add_rn(v, bias[j]) : v;
}

}  // namespace lora
}  // namespace lora_ext
