// The LoRA products whose big operand is bf16 (x or dy) and whose output is fp32 and r columns wide
// (T, dT, dB, dA^T), on tensor cores. By count the CUDA-core kernel (lora_gemm.cuh) is bound by its
// FMAs from r ~ 16 up; bf16 mma with fp32 accumulation has an order of magnitude more throughput.
//
// Precision: the same as the CUDA-core kernel's fp32 FMAs. The big operand is bf16, so exact in the
// mma. The small fp32 operand (adapter, T or dT) is split into three bf16 parts, b = hi + mid + lo
// (split3_bf16), and each part takes its own mma: every product is exact in fp32. The tensor cores'
// fp32 accumulation truncates (measured on A100 and H100 in the literature), so each K step of 32
// sums its six mmas, smallest parts first, into a fresh fragment, and the CUDA cores add that to the
// running sum with round-to-nearest: the truncation acts on one step's sum, never on the total.
// Dropout zeroes the dropped elements of x while staging (x stays exact) and its 1 / (1 - p)
// multiplies the accumulated sum.
//
// Tiling: 4 warps own a 64 x kBN output tile (kBN = 16, 32 or 64: the rank rounded up), a warp a 16-row
// strip of it, and K is walked in steps of 32 through shared memory. The epilogue goes through shared
// memory, so K splits, bounds and the output index are the CUDA-core kernel's.
//
// tests/emulation builds this file too, with a host implementation of the wmma calls used here that
// checks their pointer alignment and leading dimensions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if !defined(LORA_EXT_CUDA_EMULATION)
#include <mma.h>
#endif

#include "common/cuda_types.cuh"
#include "lora/lora_gemm.cuh"
#include "lora/lora_launch.h"

namespace lora_ext {
namespace lora {
namespace lowrank_tc {

constexpr int kThreads = 128;  // 4 warps, one 16-row strip each
constexpr int kBM = 64;
constexpr int kBK = 32;  // two mma steps of 16
constexpr int kPadA = 8, kPadB = 8, kPadC = 4;  // keep leading dims multiples of 16 bytes, shift banks

// The output columns a block covers: the rank rounded up to 16, at most 64.
inline int tile_n(int64_t N) { return N <= 16 ? 16 : N <= 32 ? 32 : 64; }

// b = hi + mid + lo, each part bf16, exactly for normal |b| >= 2^-110 (below, to within 2^-134). hi is
// b truncated, so it never rounds a finite b up to Inf; an infinite b is (Inf, 0, 0), NaN stays NaN.
__host__ __device__ __forceinline__ void split3_bf16(float b, __nv_bfloat16 parts[3]) {
  parts[0] = __float2bfloat16_rz(b);
  const float r1 = isfinite(b) ? b - __bfloat162float(parts[0]) : 0.0f;
  parts[1] = __float2bfloat16_rn(r1);
  parts[2] = __float2bfloat16_rn(r1 - __bfloat162float(parts[1]));
}

// Stages the 64 x 32 tile of a (rows i0.., k k0..ke) as bf16, dropped elements zeroed. Threads take
// groups of 4 elements consecutive along a's contiguous dimension; one Philox call drops a group
// that is an aligned group of x.
__device__ __forceinline__ void stage_a(const LowRankGemmParams& p, const __nv_bfloat16* a, bool along_k, int64_t i0,
                                        int64_t k0, int64_t ke, __nv_bfloat16 (*a_s)[kBK + kPadA]) {
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
#pragma unroll
  for (int q = 0; q < kBM * kBK / (4 * kThreads); ++q) {
    const int g = static_cast<int>(threadIdx.x) + q * kThreads;
    const int ii = along_k ? g / (kBK / 4) : (g % (kBM / 4)) * 4;
    const int kk = along_k ? (g % (kBK / 4)) * 4 : g / (kBM / 4);
    const int64_t i = i0 + ii, k = k0 + kk;
    const int64_t step = along_k ? p.a_stride_k : p.a_stride_m;
    const int64_t off = i * p.a_stride_m + k * p.a_stride_k;
    bool in[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) in[c] = along_k ? (i < p.M && k + c < ke) : (i + c < p.M && k < ke);
    __nv_bfloat16 v[4];
    if (step == 1 && in[3] && reinterpret_cast<uintptr_t>(a + off) % (4 * sizeof(__nv_bfloat16)) == 0) {
      const uint2 raw = *reinterpret_cast<const uint2*>(a + off);
      memcpy(v, &raw, sizeof(raw));
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = in[c] ? a[off + c * step] : zero;
    }
    if (p.dropout_a) {
      if (step == 1 && off % 4 == 0) {
        const Philox4 r = philox4x32_10(static_cast<uint64_t>(off) >> 2, p.dropout.seed);
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (static_cast<uint64_t>(r.v[c]) >= p.dropout.keep_threshold) v[c] = zero;
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (!dropout_keep(static_cast<uint64_t>(off + c * step), p.dropout.seed, p.dropout.keep_threshold))
            v[c] = zero;
      }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) a_s[along_k ? ii : ii + c][along_k ? kk + c : kk] = v[c];
  }
}

template <int kBN>
__global__ void __launch_bounds__(kThreads) lowrank_tc_kernel(LowRankGemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bf16 mma before sm_80; the glue sets tensor_cores only from sm_80 up
#else
  namespace wmma = nvcuda::wmma;
  constexpr int kFrags = kBN / 16;
  __shared__ __align__(32) __nv_bfloat16 a_s[kBM][kBK + kPadA];
  // b column-major ([n][k]): the mma's b fragment is k-contiguous, so its loads need no transposing moves
  __shared__ __align__(32) __nv_bfloat16 b_s[3][kBN][kBK + kPadB];
  __shared__ __align__(32) float c_s[kBM][kBN + kPadC];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t slice = lowrank::ceil_div(lowrank::ceil_div(p.K, p.splits), lowrank::kBK) * lowrank::kBK;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * slice;
  const int64_t ke = kb + slice < p.K ? kb + slice : p.K;
  const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(p.a);
  const bool a_along_k = p.a_stride_k == 1;
  const bool b_along_n = p.b_stride_n == 1;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);

  for (int64_t k0 = kb; k0 < ke; k0 += kBK) {
    stage_a(p, a, a_along_k, i0, k0, ke, a_s);
    for (int idx = tid; idx < kBK * kBN; idx += kThreads) {
      const int jj = b_along_n ? idx % kBN : idx / kBK;  // consecutive threads along b's contiguous dim
      const int kk = b_along_n ? idx / kBN : idx % kBK;
      const int64_t k = k0 + kk, j = j0 + jj;
      __nv_bfloat16 parts[3];
      split3_bf16((k < ke && j < p.N) ? p.b[k * p.b_stride_k + j * p.b_stride_n] : 0.0f, parts);
#pragma unroll
      for (int s = 0; s < 3; ++s) b_s[s][jj][kk] = parts[s];
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_frag[kBK / 16];
#pragma unroll
    for (int h = 0; h < kBK / 16; ++h) wmma::load_matrix_sync(a_frag[h], &a_s[warp * 16][h * 16], kBK + kPadA);
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> step;
      wmma::fill_fragment(step, 0.0f);
#pragma unroll
      for (int s = 2; s >= 0; --s) {  // lo, mid, hi: the small parts are not truncated away
#pragma unroll
        for (int h = 0; h < kBK / 16; ++h) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b_frag;
          wmma::load_matrix_sync(b_frag, &b_s[s][f * 16][h * 16], kBK + kPadB);
          wmma::mma_sync(step, a_frag[h], b_frag, step);
        }
      }
#pragma unroll
      for (int t = 0; t < step.num_elements; ++t) acc[f].x[t] += step.x[t];  // same layout: same fragment type
    }
    __syncthreads();
  }

#pragma unroll
  for (int f = 0; f < kFrags; ++f)
    wmma::store_matrix_sync(&c_s[warp * 16][f * 16], acc[f], kBN + kPadC, wmma::mem_row_major);
  __syncthreads();
  const float scale = p.dropout_a ? p.dropout.inv_keep : 1.0f;
  const int64_t mn = p.M * p.N;
  float* out = static_cast<float*>(p.out);
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int ii = idx / kBN, jj = idx % kBN;
    const int64_t i = i0 + ii, j = j0 + jj;
    if (i >= p.M || j >= p.N) continue;
    const int64_t e = i * p.N + j;
    const float v = mul_rn(c_s[ii][jj], scale);
    if (p.splits > 1) {
      p.workspace[static_cast<int64_t>(blockIdx.z) * mn + e] = v;
    } else {
      out[e] = lowrank::finish<float>(p, v, e, false, 0u);
    }
  }
#endif
}

// Whether a product can take this kernel: a bf16 big operand, an fp32 output with no dropout or addend
// in the epilogue (T, dT, dB, dA^T), on a GPU with bf16 mma (the glue sets tensor_cores).
inline bool eligible(const LowRankGemmParams& p) {
  return p.tensor_cores && p.a_dtype == DType::kBFloat16 && p.out_dtype == DType::kFloat32 && !p.dropout_out &&
         p.addend == nullptr;
}

inline dim3 grid(const LowRankGemmParams& p) {
  return dim3(static_cast<unsigned>(lowrank::ceil_div(p.M, kBM)),
              static_cast<unsigned>(lowrank::ceil_div(p.N, tile_n(p.N))), static_cast<unsigned>(p.splits));
}

}  // namespace lowrank_tc
}  // namespace lora
}  // namespace lora_ext
