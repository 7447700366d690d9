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

// The dropped value of v given its Philox word: v / (1 - p) (one fp32 rounding) if kept, else 0. Kernels
// that draw once for four elements pass each its word; the others use dropout_apply.
LORA_HD float dropout_with_draw(float v, uint32_t draw, const DropoutSpec& d) {
  return static_cast<uint64_t>(draw) < d.keep_threshold ? mul_rn(v, d.inv_keep) : 0.0f;
}

// dropout(x)[e] = x[e] / (1 - p) if kept else 0; its gradient applies the same factor to dy[e].
LORA_HD float dropout_apply(float v, uint64_t e, const DropoutSpec& d) {
  return dropout_with_draw(v, dropout_draw(e, d.seed), d);
}

}  // namespace lora
}  // namespace lora_ext
