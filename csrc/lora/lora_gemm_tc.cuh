// The LoRA branch's low-rank products on tensor cores (bf16 mma, fp32 accumulation), from sm_80. By
// count the CUDA-core kernel (lora_gemm.cuh) is bound by its FMAs from r ~ 16 up, and the tensor
// cores have an order of magnitude more throughput. Two kinds of product take it: a bf16 big operand
// (x or dy) into fp32 (T, dT, dB, dA^T), and fp32 operands into the activations' dtype (y and dx, and
// every product when the activations are fp32).
//
// Precision: the same as the CUDA-core kernel's fp32 FMAs. A bf16 operand is exact in the mma. An fp32
// operand is split into three bf16 parts (split3_bf16), and each pair of parts takes its own mma (3
// when a is bf16, 6 when both are fp32, leaving out three at fp32's rounding level): every product
// is exact in fp32. Non-finite inputs give non-finite outputs, but an Inf can come out as NaN where
// the CUDA-core kernel gives Inf (Inf times another value's zero part); both are what AMP's scaler
// and isfinite checks catch. The tensor cores' fp32 accumulation truncates (measured on A100 and H100
// in the literature), so each K step of 32 sums its mmas, smallest first, into a fresh fragment, and
// the CUDA cores add that to the running sum with round-to-nearest: truncation acts on one step's
// sum, never on the total. Dropout zeroes the dropped elements of x while staging (x stays exact) and
// its 1 / (1 - p) multiplies the accumulated sum; the epilogue (alpha, dx's dropout, the addend, one
// rounding) is the CUDA-core kernel's finish().
//
// Tiling: 4 warps own a 64 x kBN output tile (kBN = 16, 32 or 64: the output's width rounded up to 16,
// at most 64), a warp a 16-row strip of it, and K is walked in steps of 32 through shared memory. The
// epilogue goes through shared memory, so K splits, bounds and the output index are the CUDA-core
// kernel's.
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

// The output columns a block covers: the output's width rounded up to 16, at most 64.
inline int tile_n(int64_t N) { return N <= 16 ? 16 : N <= 32 ? 32 : 64; }

// b = hi + mid + lo, each part bf16, exactly for normal |b| >= 2^-110 (below, to within 2^-134). hi is
// b rounded to nearest (so |mid| <= 2^-8 |b|), or truncated where rounding would overflow a finite b
// to Inf; an infinite b is (Inf, 0, 0), NaN stays NaN.
__host__ __device__ __forceinline__ void split3_bf16(float b, __nv_bfloat16 parts[3]) {
  const bool finite = isfinite(b);
  parts[0] = __float2bfloat16_rn(b);
  if (finite && !isfinite(__bfloat162float(parts[0]))) parts[0] = __float2bfloat16_rz(b);
  const float r1 = finite ? b - __bfloat162float(parts[0]) : 0.0f;
  parts[1] = __float2bfloat16_rn(r1);
  parts[2] = __float2bfloat16_rn(r1 - __bfloat162float(parts[1]));
}

// bf16 parts of a: a bf16 a is exact in one, an fp32 a takes three (split3_bf16); b always three.
template <typename TA>
constexpr int kAParts = std::is_same_v<TA, float> ? 3 : 1;

// The q-th (a part, b part) product of a step, smallest first: with one a part (0,2) (0,1) (0,0); with
// three (2,0) (1,1) (0,2) (1,0) (0,1) (0,0). Those left out, (1,2) (2,1) (2,2), are each at most 2^-24
// of the largest: fp32's own rounding.
__host__ __device__ constexpr int a_part(int q, int a_parts) {
  return a_parts == 1 ? 0 : (q == 0 ? 2 : q == 1 || q == 3 ? 1 : 0);
}
__host__ __device__ constexpr int b_part(int q, int a_parts) {
  return a_parts == 1 ? 2 - q : (q == 1 || q == 4 ? 1 : q == 2 ? 2 : 0);
}

// b's three bf16 parts, once per product: p.b_parts holds part s of b[k][j] at s * N * K + j * K + k
// (k contiguous: the layout of the kernel's column-major b tile).
__global__ void __launch_bounds__(256) split_b_kernel(LowRankGemmParams p) {
  __nv_bfloat16* parts_out = static_cast<__nv_bfloat16*>(p.b_parts);
  const int64_t n = p.N * p.K, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t j = e / p.K, k = e % p.K;
    __nv_bfloat16 parts[3];
    split3_bf16(p.b[k * p.b_stride_k + j * p.b_stride_n], parts);
#pragma unroll
    for (int s = 0; s < 3; ++s) parts_out[s * n + e] = parts[s];
  }
}

// Stages the kBN x 32 tile of b's parts (columns j0.., k k0..ke) into b_s[part][n][k]: eight
// consecutive k a thread, one 16-byte load and store per part when K allows it.
template <int kBN>
__device__ __forceinline__ void stage_b(const LowRankGemmParams& p, int64_t j0, int64_t k0, int64_t ke,
                                        __nv_bfloat16 (*b_s)[kBN][kBK + kPadB]) {
  const __nv_bfloat16* parts = static_cast<const __nv_bfloat16*>(p.b_parts);
  const int64_t plane = p.N * p.K;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
  for (int g = threadIdx.x; g < kBN * kBK / 8; g += kThreads) {
    const int jj = g / (kBK / 8), kk = (g % (kBK / 8)) * 8;
    const int64_t j = j0 + jj, k = k0 + kk;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      const __nv_bfloat16* src = parts + s * plane + j * p.K + k;
      if (j < p.N && k + 8 <= ke && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
        *reinterpret_cast<uint4*>(&b_s[s][jj][kk]) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c) b_s[s][jj][kk + c] = (j < p.N && k + c < ke) ? src[c] : zero;
      }
    }
  }
}

// Stages the 64 x 32 tile of a (rows i0.., k k0..ke) as bf16 parts, dropped elements zeroed. Threads
// take groups of 4 elements consecutive along a's contiguous dimension (lowrank::load_four).
template <typename TA>
__device__ __forceinline__ void stage_a(const LowRankGemmParams& p, const TA* a, bool along_k, int64_t i0,
                                        int64_t k0, int64_t ke, __nv_bfloat16 (*a_s)[kBM][kBK + kPadA]) {
#pragma unroll
  for (int q = 0; q < kBM * kBK / (4 * kThreads); ++q) {
    const int g = static_cast<int>(threadIdx.x) + q * kThreads;
    const int ii = along_k ? g / (kBK / 4) : (g % (kBM / 4)) * 4;
    const int kk = along_k ? (g % (kBK / 4)) * 4 : g / (kBM / 4);
    float v[4];
    lowrank::load_four(p, a, along_k, i0 + ii, k0 + kk, ke, false, v);  // x stays exact: the sum is scaled
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int row = along_k ? ii : ii + c, col = along_k ? kk + c : kk;
      if constexpr (kAParts<TA> == 1) {
        a_s[0][row][col] = __float2bfloat16_rn(v[c]);  // a bf16 value, back to itself
      } else {
        __nv_bfloat16 parts[3];
        split3_bf16(v[c], parts);
#pragma unroll
        for (int s = 0; s < 3; ++s) a_s[s][row][col] = parts[s];
      }
    }
  }
}

template <typename TA, typename TC, int kBN>
__global__ void __launch_bounds__(kThreads) lowrank_tc_kernel(LowRankGemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bf16 mma before sm_80; the glue sets tensor_cores only from sm_80 up
#else
  namespace wmma = nvcuda::wmma;
  constexpr int kFrags = kBN / 16, kA = kAParts<TA>, kProducts = kA == 1 ? 3 : 6;
  __shared__ __align__(32) __nv_bfloat16 a_s[kA][kBM][kBK + kPadA];
  // b column-major ([n][k]): the mma's b fragment is k-contiguous, so its loads need no transposing moves
  __shared__ __align__(32) __nv_bfloat16 b_s[3][kBN][kBK + kPadB];
  __shared__ __align__(32) float c_s[kBM][kBN + kPadC];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBN;
  int64_t kb, ke;
  lowrank::k_slice(p, kb, ke);
  const TA* a = static_cast<const TA*>(p.a);
  const bool a_along_k = p.a_stride_k == 1;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);

  for (int64_t k0 = kb; k0 < ke; k0 += kBK) {
    stage_a(p, a, a_along_k, i0, k0, ke, a_s);
    stage_b<kBN>(p, j0, k0, ke, b_s);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_frag[kA][kBK / 16];
#pragma unroll
    for (int s = 0; s < kA; ++s)
#pragma unroll
      for (int h = 0; h < kBK / 16; ++h)
        wmma::load_matrix_sync(a_frag[s][h], &a_s[s][warp * 16][h * 16], kBK + kPadA);
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> step;
      wmma::fill_fragment(step, 0.0f);
#pragma unroll
      for (int q = 0; q < kProducts; ++q) {  // smallest first: the small parts are not truncated away
#pragma unroll
        for (int h = 0; h < kBK / 16; ++h) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b_frag;
          wmma::load_matrix_sync(b_frag, &b_s[b_part(q, kA)][f * 16][h * 16], kBK + kPadB);
          wmma::mma_sync(step, a_frag[a_part(q, kA)][h], b_frag, step);
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
  // The CUDA-core kernel's epilogue: four consecutive outputs a thread (one Philox call for dx's
  // dropout), the sum scaled by x's 1 / (1 - p) first.
  const float scale = p.dropout_a ? p.dropout.inv_keep : 1.0f;
  for (int g = tid; g < kBM * kBN / 4; g += kThreads) {
    const int ii = g / (kBN / 4), jj = (g % (kBN / 4)) * 4;
    if (i0 + ii >= p.M) continue;
    float v[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = mul_rn(c_s[ii][jj + c], scale);
    lowrank::store_outputs<TC, 4>(p, i0 + ii, j0 + jj, v);
  }
#endif
}

// Whether a product takes this kernel (on a GPU with bf16 mma: the glue sets tensor_cores): a bf16
// big operand into fp32 (T, dT, dB, dA^T over bf16 activations), or an fp32 one into any output (y and
// dx; all products over fp32 activations). fp16 activations stay on the CUDA-core kernel.
inline bool eligible(const LowRankGemmParams& p) {
  // K = 0 (a batch of no tokens for dB and dA; no output features for dT) has nothing to split or
  // multiply: the CUDA-core kernel writes alpha * 0 (+ addend) without a b_parts workspace.
  if (!p.tensor_cores || p.K == 0) return false;
  if (p.a_dtype == DType::kBFloat16) return p.out_dtype == DType::kFloat32;
  return p.a_dtype == DType::kFloat32 && p.out_dtype != DType::kFloat64;
}

inline dim3 grid(const LowRankGemmParams& p) {
  return dim3(static_cast<unsigned>(lowrank::ceil_div(p.M, kBM)),
              static_cast<unsigned>(lowrank::ceil_div(p.N, tile_n(p.N))), static_cast<unsigned>(p.splits));
}

// Calls f.template run<TA, TC>() for an eligible product's (a, out) dtype pair.
template <typename F>
void dispatch_pair(const LowRankGemmParams& p, F&& f) {
  if (p.a_dtype == DType::kBFloat16) {
    f.template run<__nv_bfloat16, float>();
  } else if (p.out_dtype == DType::kFloat32) {
    f.template run<float, float>();
  } else if (p.out_dtype == DType::kBFloat16) {
    f.template run<float, __nv_bfloat16>();
  } else {
    f.template run<float, __half>();
  }
}

}  // namespace lowrank_tc
}  // namespace lora
}  // namespace lora_ext
