// Parameters and launcher of the LoRA dropout CUDA kernel (plain C++: no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora/lora_common.h"

namespace lora_ext {
namespace lora {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct DropoutParams {
  const void* x;  // n contiguous elements
  void* out;
  int64_t n;
  DropoutSpec spec;
  DType dtype;
};

void launch_dropout(const DropoutParams& p, cudaStream_t stream);

}  // namespace lora
}  // namespace lora_ext
