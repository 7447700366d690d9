// lowrank_gemm_cpu (lora_gemm_cpu.h). Where P has many rows, Q is first packed as fp32 tiles of 16 columns
// (K x 16 each, contiguous): each tile is read once per 6 rows of P, and its loads are then sequential, where
// rows of Q a multiple of 4 KiB apart would alias in L1. Where P has few rows (dB^T = T^T dy and dA = dT^T x:
// r rows), a row-major Q (dy, x) is read where it lies, in its own dtype: packing it would cost a pass that
// writes twice its bytes, for a tile read only r / 6 times. A register block is 6 rows x 16 columns of fp32
// accumulators (AVX2/FMA: 12 of the 16 registers; 5-9% faster than 4 rows) over K, then the epilogue in
// registers. The portable loop (LORA_EXT_DISABLE_SIMD=1,
// non-x86) does the same fused multiply-adds in the same order, so both paths give the same bits.
#include "lora/lora_gemm_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/cpu_simd16.h"
#include "common/scratch.h"
#include "lora/lora_common.h"

namespace lora_ext {
namespace lora {
namespace {

constexpr int kRows = 6;             // rows of a register block
constexpr int64_t kTile = 16;        // columns of a register block, and of a packed tile of Q
constexpr int64_t kTaskRows = 30;    // rows of a parallel task: 5 register blocks
constexpr int64_t kDirectRows = 32;  // P of at most this many rows reads a row-major Q unpacked

struct Job {
  // M x K, in its own dtype (the kernels' template parameter TP); element (m, k) at m * p_row + k * p_col. A 16-bit
  // P has p_col 1; an fp32 one may be a transposed view (T^T, dT^T), read without a copy.
  const void* P;
  int64_t p_row, p_col;
  // Packed: fp32, tile t (columns 16t .. 16t + 15) is K x 16, zero past N. Else Q itself, row-major, in its own
  // dtype (the kernels' TQ), q_stride elements from a row to the next.
  const void* Q;
  bool q_packed;
  int64_t q_stride;
  const void* addend;
  void* out;
  int64_t M, N, K;
  float alpha;
  const float* col_scale;
  const float* col_bias;
};

// Where column n of Q's row 0 is; row k + 1 is j.q_stride further (16 when packed).
template <typename TQ>
inline const TQ* q_column(const Job& j, int64_t n) {
  const TQ* Q = static_cast<const TQ*>(j.Q);
  return j.q_packed ? Q + (n / kTile) * j.K * kTile + n % kTile : Q + n;
}

#if defined(LORA_EXT_X86_SIMD)
// A row's full tiles when the row is contiguous: 16 values converted in two registers.
template <typename T>
__attribute__((target("avx2,f16c"))) void pack_row_avx2(const T* row, float* dst, int64_t K, int64_t full_tiles) {
  for (int64_t t = 0; t < full_tiles; ++t) {
    float* o = dst + t * K * kTile;
    _mm256_storeu_ps(o, simd16::load8(row + t * kTile));
    _mm256_storeu_ps(o + 8, simd16::load8(row + t * kTile + 8));
  }
}
#endif

// A transposed Q (A^T, B^T: columns contiguous) into tiles [t0, t1), a column at a time over 64 rows of K: the
// reads sequential, the writes within L1. Row by row, the 16 columns read for a row of a tile are each a
// column's stride apart (4 KiB for a 1024-wide A), and alias in L1.
template <typename scalar_t>
void pack_columns(const scalar_t* src, int64_t s1, float* dst, int64_t K, int64_t N, int64_t t0, int64_t t1) {
  constexpr int64_t kRowsAtOnce = 64;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t k0 = 0; k0 < K; k0 += kRowsAtOnce) {
      const int64_t k1 = std::min(K, k0 + kRowsAtOnce);
      for (int64_t c = 0; c < kTile; ++c) {
        const int64_t n = t * kTile + c;
        float* o = dst + t * K * kTile + c;
        if (n < N) {
          for (int64_t k = k0; k < k1; ++k) o[k * kTile] = static_cast<float>(src[n * s1 + k]);
        } else {
          for (int64_t k = k0; k < k1; ++k) o[k * kTile] = 0.0f;
        }
      }
    }
  }
}

// Q (K x N, any strides and float dtype) as fp32 tiles [N / 16][K][16], zero past N.
at::Tensor pack_tiles(const at::Tensor& Q) {
  const int64_t K = Q.size(0), N = Q.size(1), tiles = (N + kTile - 1) / kTile;
  // In a buffer kept by the thread between calls, as the composites' fp32 copies: a fresh one would cost a
  // page fault every 4 KiB.
  at::Tensor packed = scratch_buffer(kPackedSlot, tiles * K * kTile, Q.options());
  float* dst = packed.data_ptr<float>();
  const int64_t s0 = Q.stride(0), s1 = Q.stride(1);
  constexpr int64_t kParallelElements = 16384;  // a task's share of Q at least; less runs on the calling thread
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Q.scalar_type(), "lora_pack_tiles_cpu", [&] {
    const scalar_t* src = Q.const_data_ptr<scalar_t>();
    if (s0 == 1 && s1 != 1) {
      const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(K * kTile, 1));
      at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { pack_columns(src, s1, dst, K, N, t0, t1); });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(N, 1));
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* row = src + k * s0;
        int64_t t = 0;
#if defined(LORA_EXT_X86_SIMD)
        if constexpr (!std::is_same_v<scalar_t, double>) {
          if (s1 == 1 && x86_simd_enabled()) {
            t = N / kTile;
            pack_row_avx2(row, dst + k * kTile, K, t);
          }
        }
#endif
        for (; t < tiles; ++t) {
          float* o = dst + (t * K + k) * kTile;
          const int64_t n0 = t * kTile, w = std::min(kTile, N - n0);
          for (int64_t c = 0; c < w; ++c) o[c] = static_cast<float>(row[(n0 + c) * s1]);
          for (int64_t c = w; c < kTile; ++c) o[c] = 0.0f;
        }
      }
    });
  });
  return packed;
}

template <typename T>
inline T finish_scalar(const Job& j, float acc, int64_t m, int64_t n) {
  float v = mul_rn(j.alpha, acc);
  if (j.addend != nullptr) v = add_rn(v, static_cast<float>(static_cast<const T*>(j.addend)[m * j.N + n]));
  return static_cast<T>(column_epilogue(v, j.col_scale, j.col_bias, n));
}

template <typename T, typename TP, typename TQ>
void rows_portable(const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  T* out = static_cast<T*>(j.out);
  const TP* P = static_cast<const TP*>(j.P);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      const TQ* q = q_column<TQ>(j, n);
      float acc = 0.0f;
      for (int64_t k = 0; k < j.K; ++k) {
        acc = std::fma(static_cast<float>(P[m * j.p_row + k * j.p_col]), static_cast<float>(q[k * j.q_stride]), acc);
      }
      out[m * j.N + n] = finish_scalar<T>(j, acc, m, n);
    }
  }
}

// The last, partial tile (columns n .. n1 - 1 < n + 16) of `rows` rows, from their sums.
template <typename T>
void finish_partial(const Job& j, const float (*sums)[kTile], int rows, int64_t m0, int64_t n, int64_t n1) {
  for (int i = 0; i < rows; ++i)
    for (int64_t c = n; c < n1; ++c)
      static_cast<T*>(j.out)[(m0 + i) * j.N + c] = finish_scalar<T>(j, sums[i][c - n], m0 + i, c);
}

#if defined(LORA_EXT_X86_SIMD)
template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline void finish8(const Job& j, __m256 acc, int64_t m, int64_t n) {
  const int64_t e = m * j.N + n;
  __m256 v = _mm256_mul_ps(_mm256_set1_ps(j.alpha), acc);
  if (j.addend != nullptr) v = _mm256_add_ps(v, simd16::load8(static_cast<const T*>(j.addend) + e));
  if (j.col_scale != nullptr) v = _mm256_mul_ps(v, _mm256_loadu_ps(j.col_scale + n));
  if (j.col_bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(j.col_bias + n));
  simd16::store8(static_cast<T*>(j.out) + e, v);
}

// Rows m0 .. m0 + R - 1, columns [n0, n1) (n0 a multiple of 16), a 16-column tile at a time. A 16-bit P is
// converted 8 values of a row at a time into an fp32 stack buffer and broadcast from there: no fp32 copy of P.
// An unpacked Q's last, partial tile is left to the caller: its loads would run past the row.
template <typename T, typename TP, typename TQ, int R>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Job& job, int64_t m0, int64_t n0, int64_t n1) {
  const Job j = job;  // a copy the stores to out cannot alias: its fields stay in registers
  const int64_t K = j.K, qs = j.q_stride, pr = j.p_row, pc = j.p_col;
  const TP* P = static_cast<const TP*>(j.P) + m0 * pr;
  const bool prefetch_next = m0 + 2 * R <= j.M;
  for (int64_t n = n0; n < n1; n += kTile) {
    const TQ* q = q_column<TQ>(j, n);
    __m256 lo[R], hi[R];  // columns n .. n + 7 and n + 8 .. n + 15 of each row
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
    int64_t k = 0;
    if constexpr (!std::is_same_v<TP, float>) {
      for (; k + 8 <= K; k += 8) {
        alignas(32) float p8[R][8];
        // The next register block's rows into L2, a cache line of each per 32 values: rows of a weight (DoRA's
        // W A^T) are streams too short (2 KiB at K = 1024) for the hardware prefetchers to ramp up on. 3584 x 1024
        // bf16 W, r = 16: 1.06 -> 0.74-0.79 ms warm, 1.19 -> 0.82 ms with W cold. (task_avx2 hands this function
        // one tile at a time, so a Q of several tiles has them fetched once per tile: a few instructions more.)
        if (prefetch_next && (k & 31) == 0) {
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(P + (R + i) * pr + k), _MM_HINT_T1);
        }
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) _mm256_store_ps(p8[i], simd16::load8(P + i * pr + k));
#pragma GCC unroll 8
        for (int kk = 0; kk < 8; ++kk, q += qs) {
          const __m256 q0 = simd16::load8(q), q1 = simd16::load8(q + 8);
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i) {
            const __m256 p = _mm256_broadcast_ss(&p8[i][kk]);
            lo[i] = _mm256_fmadd_ps(p, q0, lo[i]);
            hi[i] = _mm256_fmadd_ps(p, q1, hi[i]);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (; k < K; ++k, q += qs) {
      const __m256 q0 = simd16::load8(q), q1 = simd16::load8(q + 8);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m256 p = _mm256_set1_ps(static_cast<float>(P[i * pr + k * pc]));
        lo[i] = _mm256_fmadd_ps(p, q0, lo[i]);
        hi[i] = _mm256_fmadd_ps(p, q1, hi[i]);
      }
    }
    if (n + kTile <= n1) {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        finish8<T>(j, lo[i], m0 + i, n);
        finish8<T>(j, hi[i], m0 + i, n + 8);
      }
    } else {
      alignas(32) float sums[R][kTile];
      for (int i = 0; i < R; ++i) {
        _mm256_store_ps(sums[i], lo[i]);
        _mm256_store_ps(sums[i] + 8, hi[i]);
      }
      finish_partial<T>(j, sums, R, m0, n, n1);
    }
  }
}

// A tile at a time over all the task's rows, so that an unpacked tile is read from memory once and from the
// cache by the next rows.
template <typename T, typename TP, typename TQ>
void task_avx2(const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kTile) {
    const int64_t n_end = std::min(n1, n + kTile);
    if (!j.q_packed && n_end - n < kTile) {
      rows_portable<T, TP, TQ>(j, m0, m1, n, n_end);  // the same FMAs in the same order
      break;
    }
    int64_t m = m0;
    for (; m + kRows <= m1; m += kRows) rows_avx2<T, TP, TQ, kRows>(j, m, n, n_end);
    switch (m1 - m) {
      case 5: rows_avx2<T, TP, TQ, 5>(j, m, n, n_end); break;
      case 4: rows_avx2<T, TP, TQ, 4>(j, m, n, n_end); break;
      case 3: rows_avx2<T, TP, TQ, 3>(j, m, n, n_end); break;
      case 2: rows_avx2<T, TP, TQ, 2>(j, m, n, n_end); break;
      case 1: rows_avx2<T, TP, TQ, 1>(j, m, n, n_end); break;
      default: break;
    }
  }
}
#endif

template <typename T, typename TP, typename TQ>
void run(const Job& j) {
  if (j.M == 0 || j.N == 0) return;
  // Tasks of up to 30 rows, and of columns enough for ~8 tasks a thread: the products with few rows (dB^T,
  // dA: r of them) are cut by columns only.
  const int64_t row_tasks = (j.M + kTaskRows - 1) / kTaskRows, tiles = (j.N + kTile - 1) / kTile;
  const int64_t wanted = 8 * static_cast<int64_t>(at::get_num_threads());
  const int64_t col_tasks = std::clamp<int64_t>((wanted + row_tasks - 1) / row_tasks, 1, std::max<int64_t>(tiles, 1));
  const int64_t task_cols = (tiles + col_tasks - 1) / col_tasks * kTile;
  // Calls of less than ~64k multiply-adds in all run on the calling thread.
  const int64_t task_work = std::max<int64_t>(1, std::min(j.M, kTaskRows) * std::min(j.N, task_cols) * j.K);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / task_work);
  const bool simd = x86_fma_enabled();
  const auto task = [&](int64_t t) {
    const int64_t m0 = (t / col_tasks) * kTaskRows, n0 = (t % col_tasks) * task_cols;
    const int64_t m1 = std::min(j.M, m0 + kTaskRows), n1 = std::min(j.N, n0 + task_cols);
    if (n0 >= n1) return;
#if defined(LORA_EXT_X86_SIMD)
    if (simd) return task_avx2<T, TP, TQ>(j, m0, m1, n0, n1);
#endif
    rows_portable<T, TP, TQ>(j, m0, m1, n0, n1);
  };
  at::parallel_for(0, row_tasks * col_tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task(t);
  });
}

// The kernel for out's dtype T, P's dtype and (unpacked) Q's dtype: a packed Q is fp32, and only an fp32 P
// (T^T and dT^T, the products with few rows) reads Q unpacked.
template <typename T>
void run_for(const Job& j, at::ScalarType p_dtype, at::ScalarType q_dtype) {
  if (!j.q_packed) {
    TORCH_INTERNAL_ASSERT(p_dtype == at::kFloat);
    switch (q_dtype) {
      case at::kFloat: return run<T, float, float>(j);
      case at::kBFloat16: return run<T, float, c10::BFloat16>(j);
      case at::kHalf: return run<T, float, c10::Half>(j);
      default: TORCH_INTERNAL_ASSERT(false, "lowrank_gemm_cpu: Q must be fp32, bf16 or fp16, got ", q_dtype);
    }
  }
  switch (p_dtype) {
    case at::kFloat: return run<T, float, float>(j);
    case at::kBFloat16: return run<T, c10::BFloat16, float>(j);
    case at::kHalf: return run<T, c10::Half, float>(j);
    default: TORCH_INTERNAL_ASSERT(false, "lowrank_gemm_cpu: P must be fp32, bf16 or fp16, got ", p_dtype);
  }
}

}  // namespace

void lowrank_gemm_cpu(const at::Tensor& P_any, const at::Tensor& Q, const at::Tensor& addend, at::Tensor& out,
                      float alpha, const float* col_scale, const float* col_bias) {
  TORCH_INTERNAL_ASSERT(P_any.device().is_cpu() && P_any.dim() == 2 && Q.dim() == 2 && out.is_contiguous() &&
                        P_any.size(1) == Q.size(0) && out.size(0) == P_any.size(0) && out.size(1) == Q.size(1));
  TORCH_INTERNAL_ASSERT(!addend.defined() || (addend.is_contiguous() && addend.sizes() == out.sizes() &&
                                              addend.scalar_type() == out.scalar_type()));
  const bool p_fp32 = P_any.scalar_type() == at::kFloat;
  const at::Tensor P = p_fp32 || P_any.stride(1) == 1 ? P_any : P_any.contiguous();
  const at::ScalarType q_dtype = Q.scalar_type();
  const bool direct = P.size(0) <= kDirectRows && p_fp32 && Q.stride(1) == 1 &&
                      (q_dtype == at::kFloat || q_dtype == at::kBFloat16 || q_dtype == at::kHalf);
  const at::Tensor packed = direct ? Q : pack_tiles(Q);
  const Job j{P.const_data_ptr(), P.stride(0), P.stride(1), packed.const_data_ptr(), !direct,
              direct ? Q.stride(0) : kTile, addend.defined() ? addend.const_data_ptr() : nullptr, out.data_ptr(),
              out.size(0), out.size(1), P.size(1), alpha, col_scale, col_bias};
  switch (out.scalar_type()) {
    case at::kFloat: return run_for<float>(j, P.scalar_type(), q_dtype);
    case at::kBFloat16: return run_for<c10::BFloat16>(j, P.scalar_type(), q_dtype);
    case at::kHalf: return run_for<c10::Half>(j, P.scalar_type(), q_dtype);
    default: TORCH_INTERNAL_ASSERT(false, "lowrank_gemm_cpu: out must be fp32, bf16 or fp16, got ", out.scalar_type());
  }
}

}  // namespace lora
}  // namespace lora_ext
