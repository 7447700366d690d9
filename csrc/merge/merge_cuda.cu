// In-place merge on CUDA: a block owns kRows rows x 256 columns of W; each thread keeps kRows fp64
// accumulators so every A value it loads serves kRows rows. W is read and written once.
#include <cstdint>

#include "common/cuda_types.cuh"
#include "common/launch.cuh"
#include "merge/merge_common.h"
#include "merge/merge_launch.h"

namespace lora_ext {
namespace merge {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(MergeParams p) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (col >= p.k) return;  // no barriers below: threads may leave independently
  double acc[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = 0.0;
  for (int64_t j = 0; j < p.r; ++j) {
    const double a = p.A[j * p.k + col];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (row0 + i < p.d) acc[i] = add_rn(acc[i], mul_rn(p.B[(row0 + i) * p.r + j], a));
  }
  T* W = static_cast<T*>(p.W);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (row0 + i < p.d) {
      T* w = W + (row0 + i) * p.k + col;
      *w = from_float<T>(merged_value(static_cast<double>(to_float(*w)), p.scale, acc[i], p.sign));
    }
  }
}

}  // namespace

void launch_merge(const MergeParams& p, cudaStream_t stream) {
  if (p.d == 0 || p.k == 0) return;
  const dim3 grid(static_cast<unsigned>((p.k + kThreads - 1) / kThreads), static_cast<unsigned>((p.d + kRows - 1) / kRows));
  switch (p.dtype) {
    case DType::kFloat16: launch_kernel(merge_kernel<__half>, grid, kThreads, stream, p); break;
    case DType::kBFloat16: launch_kernel(merge_kernel<__nv_bfloat16>, grid, kThreads, stream, p); break;
    default: launch_kernel(merge_kernel<float>, grid, kThreads, stream, p);
  }
}

}  // namespace merge
}  // namespace lora_ext
