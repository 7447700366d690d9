// DoRA's column dots on CUDA: dg's sum_i dy_ij (x W^T)_ij, one fp32 partial sum per column and row slice.
// A block owns 32 columns of one row slice: its 8 warps each walk every 8th row, a warp reading 32
// consecutive elements of a row, then the 8 sums are added in order through shared memory. No atomics:
// the result does not depend on the schedule.
//
// The host compiler also builds this file in tests/emulation (launch_kernel, cuda_emulation.h).
#include <algorithm>

#include "common/cuda_types.cuh"
#include "common/launch.cuh"
#include "dora/dora_common.h"
#include "dora/dora_launch.h"

namespace lora_ext {
namespace dora {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 32;                    // columns per block: a warp's row segment
constexpr int kRowGroups = kThreads / kCols;  // rows walked at once
constexpr int64_t kMinSliceRows = 64;

__host__ __device__ __forceinline__ int64_t slice_rows(int64_t M, int splits) { return (M + splits - 1) / splits; }

template <typename T>
__global__ void __launch_bounds__(kThreads) column_dot_kernel(ColumnDotParams p) {
  __shared__ float sums[kRowGroups][kCols];
  const int tx = static_cast<int>(threadIdx.x) % kCols, ty = static_cast<int>(threadIdx.x) / kCols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const int64_t rows = slice_rows(p.M, p.splits);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * rows;
  const int64_t i1 = i0 + rows < p.M ? i0 + rows : p.M;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  float acc = 0.0f;
  if (j < p.N) {
    for (int64_t i = i0 + ty; i < i1; i += kRowGroups) {
      acc = dot_step(acc, to_float(a[i * p.N + j]), to_float(b[i * p.N + j]));
    }
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < p.N) {
    float s = 0.0f;
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) s = add_rn(s, sums[g][tx]);
    p.partial[static_cast<int64_t>(blockIdx.y) * p.N + j] = s;
  }
}

}  // namespace

int column_dot_splits(int64_t M, int64_t N, int64_t target_blocks) {
  const int64_t col_blocks = std::max<int64_t>(1, (N + kCols - 1) / kCols);
  const int64_t most = std::max<int64_t>(1, (M + kMinSliceRows - 1) / kMinSliceRows);
  const int64_t want = (target_blocks + col_blocks - 1) / col_blocks;
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 65535)));
}

bool launch_column_dots(const ColumnDotParams& p, cudaStream_t stream) {
  if (p.N == 0) return true;
  const dim3 grid(static_cast<unsigned>((p.N + kCols - 1) / kCols), static_cast<unsigned>(p.splits));
  switch (p.dtype) {
    case DType::kFloat32: launch_kernel(column_dot_kernel<float>, grid, kThreads, stream, p); return true;
    case DType::kFloat16: launch_kernel(column_dot_kernel<__half>, grid, kThreads, stream, p); return true;
    case DType::kBFloat16: launch_kernel(column_dot_kernel<__nv_bfloat16>, grid, kThreads, stream, p); return true;
    default: return false;
  }
}

}  // namespace dora
}  // namespace lora_ext
