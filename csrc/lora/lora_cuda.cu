// LoRA dropout on CUDA: each thread draws one Philox4x32-10 block and masks 4 consecutive elements.
#include <cstdint>

#include "common/cuda_types.cuh"
#include "common/launch.cuh"
#include "lora/lora_launch.h"

namespace lora_ext {
namespace lora {
namespace {

constexpr int kThreads = 256;

// The kept value: 16- and 32-bit inputs scale in fp32 and round once (as on the CPU); float64 stays
// in float64 (gradcheck).
template <typename T>
__device__ __forceinline__ T dropped(T v, uint32_t draw, const DropoutSpec& d) {
  return from_float<T>(dropout_with_draw(to_float(v), draw, d));
}
template <>
__device__ __forceinline__ double dropped<double>(double v, uint32_t draw, const DropoutSpec& d) {
  return draw < d.keep_threshold ? v * static_cast<double>(d.inv_keep) : 0.0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_kernel(DropoutParams p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t groups = (p.n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < groups; c += stride) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(c), p.spec.seed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * c + j;
      if (e < p.n) out[e] = dropped<T>(x[e], r.v[j], p.spec);
    }
  }
}

}  // namespace

void launch_dropout(const DropoutParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const unsigned grid = grid_for((p.n + 3) / 4, kThreads);
  switch (p.dtype) {
    case DType::kFloat16: launch_kernel(dropout_kernel<__half>, grid, kThreads, stream, p); break;
    case DType::kBFloat16: launch_kernel(dropout_kernel<__nv_bfloat16>, grid, kThreads, stream, p); break;
    case DType::kFloat64: launch_kernel(dropout_kernel<double>, grid, kThreads, stream, p); break;
    default: launch_kernel(dropout_kernel<float>, grid, kThreads, stream, p);
  }
}

}  // namespace lora
}  // namespace lora_ext
