// Per-element math of DoRA's kernel of its own, shared by the CPU and CUDA versions.
#pragma once

#include "common/hd.h"

namespace lora_ext {
namespace dora {

// One step of a column's dot sum_i dy_ij z_ij (dg's): the product and the sum rounded separately.
LORA_HD float dot_step(float acc, float a, float b) { return add_rn(acc, mul_rn(a, b)); }

}  // namespace dora
}  // namespace lora_ext
