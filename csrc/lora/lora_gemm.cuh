// The skinny products of the LoRA branch on CUDA cores. Forward: T = dropout(x) A^T, then
// y = base + s T B^T. Backward: dT = s dy B, dB = s dy^T T, dA^T = dropout(x)^T dT, and
// dx = dropout'(dT A). Each is one launch of the kernel below (lora_gemm_cuda.cu launches them). It
// reads the big operand (x or dy) once per column tile in its own dtype, converts and drops out in
// registers, and accumulates in fp32. There is no cast pass, no dropout(x) copy and no materialized
// transpose.
//
// Tiling: 256 threads own a 64 x (16 * kTN) output tile (4 x kTN values each), and K is walked in
// steps of 16 through shared memory. kTN = 1 for outputs 16 columns wide or less (r <= 16), 4 otherwise.
// Reductions over tokens (dB, dA) have few output tiles. Their K is cut into `splits` slices whose
// fp32 partial sums are added in order by a second kernel: deterministic, no atomics.
//
// The host compiler also builds this file in tests/emulation, one std::thread per CUDA thread, so
// the CPU test run executes this very source. Keep it to what that harness maps: threadIdx,
// blockIdx, blockDim, gridDim, __shared__ and __syncthreads.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_types.cuh"
#include "lora/lora_launch.h"

namespace lora_ext {
namespace lora {
namespace lowrank {

constexpr int kThreads = 256;  // 16 x 16
constexpr int kBM = 64;        // output rows per block
constexpr int kTM = 4;         // output rows per thread
constexpr int kBK = 16;        // K per shared-memory step
static_assert(kBM * kBK == 4 * kThreads, "each thread stages 4 elements of the A tile");

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The one rounding of an output value: alpha * acc, dropout (dx), + addend (base output), then DoRA's
// column scale and bias (y). `draw` is element e's Philox word when the caller drew it for a group of
// four (`drawn`). `col` is e's column (e % N, which the callers know without a 64-bit division).
template <typename TC>
__device__ __forceinline__ TC finish(const LowRankGemmParams& p, float acc, int64_t e, int64_t col, bool drawn,
                                     uint32_t draw) {
  float v = mul_rn(p.alpha, acc);
  if (p.dropout_out) {
    v = dropout_with_draw(v, drawn ? draw : dropout_draw(static_cast<uint64_t>(e), p.dropout.seed), p.dropout);
  }
  if (p.addend != nullptr) v = add_rn(v, to_float(static_cast<const TC*>(p.addend)[e]));
  if (p.col_scale != nullptr || p.col_bias != nullptr) v = column_epilogue(v, p.col_scale, p.col_bias, col);
  return from_float<TC>(v);
}

// This block's K slice [kb, ke) (blockIdx.z of p.splits); an empty one (kb >= K) writes zeros.
__device__ __forceinline__ void k_slice(const LowRankGemmParams& p, int64_t& kb, int64_t& ke) {
  const int64_t slice = k_slice_length(p.K, p.splits);
  kb = static_cast<int64_t>(blockIdx.z) * slice;
  ke = kb + slice < p.K ? kb + slice : p.K;
}

// Stores kN consecutive outputs of row i from column j (those inside the matrix): the K slice's
// partial sums into the workspace, or finish()ed into out. dx's dropout draws one Philox call for
// the four when they are one aligned group of the output.
template <typename TC, int kN>
__device__ __forceinline__ void store_outputs(const LowRankGemmParams& p, int64_t i, int64_t j, const float (&v)[kN]) {
  const int64_t e0 = i * p.N + j;
  const bool grouped = kN == 4 && p.dropout_out && p.splits == 1 && e0 % 4 == 0;
  Philox4 r{};
  if (grouped) r = philox4x32_10(static_cast<uint64_t>(e0) >> 2, p.dropout.seed);
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    if (j + n >= p.N) break;
    if (p.splits > 1) {
      p.workspace[static_cast<int64_t>(blockIdx.z) * p.M * p.N + e0 + n] = v[n];
    } else {
      static_cast<TC*>(p.out)[e0 + n] = finish<TC>(p, v[n], e0 + n, j + n, grouped, r.v[n]);
    }
  }
}

// Four elements of a, at rows i.. and columns k.. (i + c along m, or k + c along k: a's contiguous
// dimension), as floats: 0 outside the matrix or the K slice (ke), one 8- or 16-byte load when the
// four are contiguous and aligned. When dropout is on, dropped elements are zeroed and, if `scale`,
// kept ones multiplied by 1 / (1 - p): one Philox call draws all four when they form one aligned group
// of x (x's flat index 4c..4c+3), as the CPU kernel draws them.
template <typename TA>
__device__ __forceinline__ void load_four(const LowRankGemmParams& p, const TA* a, bool along_k, int64_t i, int64_t k,
                                          int64_t ke, bool scale, float v[4]) {
  const int64_t step = along_k ? p.a_stride_k : p.a_stride_m;  // offset between the four
  const int64_t off = i * p.a_stride_m + k * p.a_stride_k;
  bool in[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) in[c] = along_k ? (i < p.M && k + c < ke) : (i + c < p.M && k < ke);
  if (step == 1 && in[3] && reinterpret_cast<uintptr_t>(a + off) % (4 * sizeof(TA)) == 0) {
    using Vec = std::conditional_t<sizeof(TA) == 2, uint2, uint4>;
    const Vec raw = *reinterpret_cast<const Vec*>(a + off);
    TA vals[4];
    memcpy(vals, &raw, sizeof(raw));  // not a TA* into raw: that breaks strict aliasing (register moves either way)
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = to_float(vals[c]);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = in[c] ? to_float(a[off + c * step]) : 0.0f;
  }
  if (!p.dropout_a) return;
  uint32_t draw[4];
  if (step == 1 && off % 4 == 0) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(off) >> 2, p.dropout.seed);
#pragma unroll
    for (int c = 0; c < 4; ++c) draw[c] = r.v[c];
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) draw[c] = dropout_draw(static_cast<uint64_t>(off + c * step), p.dropout.seed);
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    v[c] = scale ? dropout_with_draw(v[c], draw[c], p.dropout)
                 : (static_cast<uint64_t>(draw[c]) < p.dropout.keep_threshold ? v[c] : 0.0f);
  }
}

// Each thread stages 4 elements of the 64 x 16 A tile that are consecutive along a's contiguous
// dimension (load_four), transposed into a_s[k][m].
template <typename TA>
__device__ __forceinline__ void load_a_group(const LowRankGemmParams& p, const TA* a, bool along_k, int64_t i0,
                                             int64_t k0, int64_t ke, float (*a_s)[kBM + 4]) {
  const int t = threadIdx.x;
  const int ii = along_k ? t >> 2 : (t & 15) * 4;
  const int kk = along_k ? (t & 3) * 4 : t >> 4;
  float v[4];
  load_four(p, a, along_k, i0 + ii, k0 + kk, ke, true, v);
#pragma unroll
  for (int c = 0; c < 4; ++c) a_s[along_k ? kk + c : kk][along_k ? ii : ii + c] = v[c];
}

template <typename TA, typename TC, int kTN>
__global__ void __launch_bounds__(kThreads) lowrank_gemm_kernel(LowRankGemmParams p) {
  constexpr int kBN = 16 * kTN;
  // +4 floats of padding per row: fewer bank conflicts on the transposed stores
  __shared__ float a_s[kBK][kBM + 4];
  __shared__ float b_s[kBK][kBN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBN;
  int64_t kb, ke;
  k_slice(p, kb, ke);
  const TA* a = static_cast<const TA*>(p.a);
  // Threads load along whichever dimension is contiguous, so the loads coalesce.
  const bool a_along_k = p.a_stride_k == 1;
  const bool b_along_n = p.b_stride_n == 1;

  float acc[kTM][kTN];
#pragma unroll
  for (int m = 0; m < kTM; ++m)
#pragma unroll
    for (int n = 0; n < kTN; ++n) acc[m][n] = 0.0f;

  for (int64_t k0 = kb; k0 < ke; k0 += kBK) {
    load_a_group(p, a, a_along_k, i0, k0, ke, a_s);
    for (int idx = tid; idx < kBK * kBN; idx += kThreads) {
      const int jj = b_along_n ? idx % kBN : idx / kBK;
      const int kk = b_along_n ? idx / kBN : idx % kBK;
      const int64_t k = k0 + kk, j = j0 + jj;
      b_s[kk][jj] = (k < ke && j < p.N) ? p.b[k * p.b_stride_k + j * p.b_stride_n] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[kTM], bv[kTN];
#pragma unroll
      for (int m = 0; m < kTM; ++m) av[m] = a_s[kk][ty * kTM + m];
#pragma unroll
      for (int n = 0; n < kTN; ++n) bv[n] = b_s[kk][tx * kTN + n];
#pragma unroll
      for (int m = 0; m < kTM; ++m)
#pragma unroll
        for (int n = 0; n < kTN; ++n) acc[m][n] = fmaf(av[m], bv[n], acc[m][n]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int m = 0; m < kTM; ++m) {
    const int64_t i = i0 + ty * kTM + m;
    if (i >= p.M) break;
    store_outputs<TC, kTN>(p, i, j0 + tx * kTN, acc[m]);
  }
}

// Sums the K slices' partial products in slice order, then rounds once as the main kernel would.
template <typename TC>
__global__ void __launch_bounds__(kThreads) split_sum_kernel(LowRankGemmParams p) {
  const int64_t mn = p.M * p.N;
  TC* out = static_cast<TC*>(p.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < mn; e += stride) {
    float s = 0.0f;
    for (int z = 0; z < p.splits; ++z) s = add_rn(s, p.workspace[z * mn + e]);
    out[e] = finish<TC>(p, s, e, e % p.N, false, 0u);
  }
}

// Output columns per thread: 1 for outputs 16 wide or less (r <= 16), else 4.
inline int tile_n(int64_t N) { return N <= 16 ? 1 : 4; }

inline dim3 gemm_grid(const LowRankGemmParams& p) {
  return dim3(static_cast<unsigned>(ceil_div(p.M, kBM)), static_cast<unsigned>(ceil_div(p.N, 16 * tile_n(p.N))),
              static_cast<unsigned>(p.splits));
}

inline dim3 split_sum_grid(const LowRankGemmParams& p) { return dim3(grid_for(p.M * p.N, kThreads)); }

// Calls f.template run<TA, TC>() for p's (a, out) dtype pair: the pairs the LoRA branch uses,
// a big operand in and fp32 out (T, dT, dB, dA), or fp32 in and the activation dtype out (y, dx).
// false, calling nothing, for any other pair (fp64 goes through the cuBLAS composite).
template <typename F>
bool dispatch_pair(const LowRankGemmParams& p, F&& f) {
  if (p.out_dtype == DType::kFloat32 && p.a_dtype == DType::kFloat32) {
    f.template run<float, float>();
  } else if (p.out_dtype == DType::kFloat32 && p.a_dtype == DType::kFloat16) {
    f.template run<__half, float>();
  } else if (p.out_dtype == DType::kFloat32 && p.a_dtype == DType::kBFloat16) {
    f.template run<__nv_bfloat16, float>();
  } else if (p.a_dtype == DType::kFloat32 && p.out_dtype == DType::kFloat16) {
    f.template run<float, __half>();
  } else if (p.a_dtype == DType::kFloat32 && p.out_dtype == DType::kBFloat16) {
    f.template run<float, __nv_bfloat16>();
  } else {
    return false;
  }
  return true;
}

}  // namespace lowrank
}  // namespace lora
}  // namespace lora_ext
