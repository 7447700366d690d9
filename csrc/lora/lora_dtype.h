// The launch headers' DType of a tensor's scalar type, for the torch-side glue of the LoRA and the
// mixed-batch kernels (lora_launch.h itself stays free of torch headers).
#pragma once

#include <ATen/ATen.h>

#include "lora/lora_launch.h"

namespace lora_ext {
namespace lora {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "lora_ext: expected a floating-point tensor (float32, float16, bfloat16, float64), got ", t);
  }
  return DType::kFloat32;
}

}  // namespace lora
}  // namespace lora_ext
