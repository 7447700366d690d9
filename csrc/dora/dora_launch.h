// Parameters and launcher of DoRA's one kernel of its own (plain C++: no torch headers). The rest of
// DoRA's layer runs on the LoRA products (lora_plan.h): g and the bias in y's epilogue, g * B as the B
// of the backward's products.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora/lora_launch.h"

namespace lora_ext {
namespace dora {

using lora::DType;

// The column dots of dg: partial[s * N + j] = sum over the rows i of slice s of a[i, j] * b[i, j], with a
// and b contiguous M x N in `dtype` (fp32, fp16 or bf16), fp32 products and sums in a fixed order. The
// caller sums the `splits` slices (dg_j = sum_i dy_ij (x W^T)_ij + its LoRA part).
struct ColumnDotParams {
  const void* a;
  const void* b;
  DType dtype;
  float* partial;  // splits * N floats
  int64_t M, N;
  int splits;
};

// Row slices to cut M into so that the launch has about target_blocks blocks (at most ceil(M / 64) slices).
int column_dot_splits(int64_t M, int64_t N, int64_t target_blocks);
// false (nothing launched) for a dtype the kernel is not built for.
bool launch_column_dots(const ColumnDotParams& p, cudaStream_t stream);

}  // namespace dora
}  // namespace lora_ext
