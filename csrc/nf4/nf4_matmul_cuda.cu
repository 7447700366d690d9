// Fused NF4 GEMV for decode and short prefill: each warp owns one output feature n, streams its
// packed weight row once (16 bytes = 32 weights per lane per step), decodes in registers and
// multiplies against up to kTileM rows of x, then reduces across the warp. Weight bytes are read
// once per tile of x rows; nothing dequantized is written.
#include <cstdint>
#include <cstring>

#include "common/cuda_types.cuh"
#include "common/launch.cuh"
#include "nf4/nf4_common.h"
#include "nf4/nf4_matmul_launch.h"
#include "nf4/nf4_scales.cuh"

namespace lora_ext {
namespace nf4 {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 32;  // weights per lane per step (one uint4 of packed bytes)

template <typename T>
__device__ __forceinline__ void load_x_chunk(const T* src, float* dst) {
  // 32 consecutive x values, 16-byte aligned (checked by the launcher).
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < kChunk / kPerVec; ++v) {
    const uint4 raw = reinterpret_cast<const uint4*>(src)[v];
    T vals[kPerVec];
    memcpy(vals, &raw, sizeof(raw));  // not a T* into raw: that breaks strict aliasing
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) dst[v * kPerVec + j] = to_float(vals[j]);
  }
}

template <typename T, int kTileM, bool kVec>
__global__ void __launch_bounds__(kThreads) nf4_gemv_kernel(GemvParams p) {
  __shared__ float code_s[16];
  if (threadIdx.x < 16) code_s[threadIdx.x] = code_value(threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= p.N) return;  // whole warp leaves together: n is uniform across the warp
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t left = p.M - m0;
  const int rows = left < kTileM ? static_cast<int>(left) : kTileM;
  const BlockScales scales = load_scales(p.scales);
  const T* x = static_cast<const T*>(p.x) + m0 * p.ldx;
  const int64_t row0 = n * p.K;  // flat index of W[n, 0]
  float acc[kTileM];
#pragma unroll
  for (int m = 0; m < kTileM; ++m) acc[m] = 0.0f;

  if (kVec) {  // K % 32 == 0: each 32-weight chunk sits inside one block and starts on a byte
    for (int64_t c = lane; c < p.K / kChunk; c += 32) {
      const int64_t f = row0 + c * kChunk;
      const uint4 raw = *reinterpret_cast<const uint4*>(p.packed + f / 2);
      const float s = scales(f >> p.blocksize_log2);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
      float w[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j) {
        const uint32_t byte = (words[j >> 2] >> (8 * (j & 3))) & 0xffu;
        w[2 * j] = mul_rn(code_s[byte >> 4], s);
        w[2 * j + 1] = mul_rn(code_s[byte & 15u], s);
      }
#pragma unroll
      for (int m = 0; m < kTileM; ++m) {
        if (m < rows) {
          float xv[kChunk];
          load_x_chunk(x + m * p.ldx + c * kChunk, xv);
#pragma unroll
          for (int j = 0; j < kChunk; ++j) acc[m] = fmaf(xv[j], w[j], acc[m]);
        }
      }
    }
  } else {  // any K: lane-strided elements, still coalesced across the warp
    for (int64_t k = lane; k < p.K; k += 32) {
      const int64_t f = row0 + k;
      const uint32_t byte = p.packed[f >> 1];
      const float w = mul_rn(code_s[(f & 1) ? (byte & 15u) : (byte >> 4)], scales(f >> p.blocksize_log2));
#pragma unroll
      for (int m = 0; m < kTileM; ++m)
        if (m < rows) acc[m] = fmaf(to_float(x[m * p.ldx + k]), w, acc[m]);
    }
  }
  const float b = p.bias != nullptr ? to_float(static_cast<const T*>(p.bias)[n]) : 0.0f;
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int m = 0; m < kTileM; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    if (lane == 0 && m < rows) y[(m0 + m) * p.N + n] = from_float<T>(v + b);
  }
}

template <typename T, int kTileM>
void launch_tiled(const GemvParams& p, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + kWarps - 1) / kWarps), static_cast<unsigned>((p.M + kTileM - 1) / kTileM));
  if (vec) {
    launch_kernel(nf4_gemv_kernel<T, kTileM, true>, grid, kThreads, stream, p);
  } else {
    launch_kernel(nf4_gemv_kernel<T, kTileM, false>, grid, kThreads, stream, p);
  }
}

template <typename T>
void launch_typed(const GemvParams& p, cudaStream_t stream) {
  const bool vec = p.K % kChunk == 0 && reinterpret_cast<uintptr_t>(p.packed) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && (p.ldx * sizeof(T)) % 16 == 0;
  if (p.M == 1) {
    launch_tiled<T, 1>(p, vec, stream);
  } else {
    launch_tiled<T, 4>(p, vec, stream);
  }
}

}  // namespace

void launch_nf4_gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  switch (p.dtype) {
    case DType::kFloat16: launch_typed<__half>(p, stream); break;
    case DType::kBFloat16: launch_typed<__nv_bfloat16>(p, stream); break;
    default: launch_typed<float>(p, stream);
  }
}

}  // namespace nf4
}  // namespace lora_ext
