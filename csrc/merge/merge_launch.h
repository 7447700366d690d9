// Parameters and launcher of the in-place merge kernel (plain C++, no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lora_ext {
namespace merge {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct MergeParams {
  void* W;          // d x k, contiguous, of dtype
  const double* A;  // r x k
  const double* B;  // d x r
  int64_t d, k, r;
  double scale;
  double sign;      // +1 merge, -1 unmerge
  DType dtype;
};

void launch_merge(const MergeParams& p, cudaStream_t stream);

}  // namespace merge
}  // namespace lora_ext
