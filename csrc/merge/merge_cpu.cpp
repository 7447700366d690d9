// In-place merge / unmerge on the CPU: each row of W is read and written once; its delta is
// accumulated in fp64 in a per-thread row buffer (merge_common.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_features.h"
#include "common/cpu_simd16.h"
#include "common/dispatch.h"
#include "merge/merge_checks.h"
#include "merge/merge_common.h"

namespace lora_ext {
namespace merge {
namespace {

#if defined(LORA_EXT_X86_SIMD)
// Row of W (8 values at w) <- T(float(w +/- scale * acc)): merged_value's fp64 math 8 values at a time (multiply
// and add rounded separately; fp64 -> fp32 and fp32 -> T rounding to nearest even, as the casts).
template <typename T>
__attribute__((target("avx2,f16c"), always_inline)) inline void finish_row8(T* w, __m256d acc_lo, __m256d acc_hi,
                                                                             __m256d signed_scale) {
  const __m256 w32 = simd16::load8(w);
  const __m256d lo = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w32)), _mm256_mul_pd(signed_scale, acc_lo));
  const __m256d hi = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(w32, 1)), _mm256_mul_pd(signed_scale, acc_hi));
  simd16::store8(w, _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)));
}

// Rows [i0, i0 + 4) x columns [c0, c0 + 8) of W merged: 8 fp64 accumulators in registers, each A value loaded
// once for four rows, then written into W from the registers. Multiply and add stay separate (no FMA), so the
// sums equal the scalar loop's. A8 holds A's columns [c0, c0 + 8) as r rows of 8 contiguous values (pack_a8):
// A's own rows are k values apart, 32 KiB for k = 4096, and r of them alias in one L1 set: the tile then
// waited on L2 for every load (a 4096^2 merge took 15.5 ms, 13.0 with the packed A).
template <typename T>
__attribute__((target("avx2,f16c"))) void merge_tile_4x8(T* W, const double* A8, const double* B, int64_t i0,
                                                          int64_t c0, int64_t k, int64_t r, double signed_scale) {
  __m256d acc[4][2];
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
  for (int64_t j = 0; j < r; ++j) {
    const __m256d a0 = _mm256_loadu_pd(A8 + j * 8), a1 = _mm256_loadu_pd(A8 + j * 8 + 4);
    for (int i = 0; i < 4; ++i) {
      const __m256d b = _mm256_set1_pd(B[(i0 + i) * r + j]);
      acc[i][0] = _mm256_add_pd(acc[i][0], _mm256_mul_pd(b, a0));
      acc[i][1] = _mm256_add_pd(acc[i][1], _mm256_mul_pd(b, a1));
    }
  }
  const __m256d s = _mm256_set1_pd(signed_scale);
  for (int i = 0; i < 4; ++i) finish_row8(W + (i0 + i) * k + c0, acc[i][0], acc[i][1], s);
}
#endif

// A (r x k) as [k / 8][r][8]: the tiles' operand (the last k % 8 columns are read from A itself).
at::Tensor pack_a8(const at::Tensor& A64) {
  const int64_t r = A64.size(0), k8 = A64.size(1) / 8;
  return A64.narrow(1, 0, k8 * 8).reshape({r, k8, 8}).permute({1, 0, 2}).contiguous();
}

template <typename T>
void merge_rows(T* W, const double* A, const double* A8, const double* B, int64_t d, int64_t k, int64_t r,
                double scale, double sign) {
  at::parallel_for(0, d, std::max<int64_t>(1, 4096 / std::max<int64_t>(k / 64, 1)), [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(LORA_EXT_X86_SIMD)
    if (x86_simd_enabled()) {
      for (; i + 4 <= i1; i += 4) {
        int64_t c = 0;
        for (; c + 8 <= k; c += 8) merge_tile_4x8(W, A8 + c * r, B, i, c, k, r, sign * scale);
        for (; c < k; ++c) {  // ragged columns
          for (int ii = 0; ii < 4; ++ii) {
            double acc = 0.0;
            for (int64_t j = 0; j < r; ++j) acc = add_rn(acc, mul_rn(B[(i + ii) * r + j], A[j * k + c]));
            T* w = W + (i + ii) * k + c;
            *w = static_cast<T>(merged_value(static_cast<double>(static_cast<float>(*w)), scale, acc, sign));
          }
        }
      }
    }
#endif
    std::vector<double> acc(static_cast<size_t>(k));
    for (; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < r; ++j) {
        const double b = B[i * r + j];
        const double* a = A + j * k;
        for (int64_t c = 0; c < k; ++c) acc[c] = add_rn(acc[c], mul_rn(b, a[c]));
      }
      T* w = W + i * k;
      for (int64_t c = 0; c < k; ++c)
        w[c] = static_cast<T>(merged_value(static_cast<double>(static_cast<float>(w[c])), scale, acc[c], sign));
    }
  });
}

void merge_impl(const char* op, at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale, double sign) {
  check_merge_args(op, W, A, B);
  const at::Tensor A64 = A.to(at::kDouble).contiguous(), B64 = B.to(at::kDouble).contiguous();
  const at::Tensor A8 = x86_simd_enabled() ? pack_a8(A64) : at::Tensor();  // only the AVX2 tiles read it
  LORA_DISPATCH_FLOAT_TYPES(W.scalar_type(), "merge_lora_cpu", [&] {
    merge_rows(W.data_ptr<scalar_t>(), A64.const_data_ptr<double>(),
               A8.defined() ? A8.const_data_ptr<double>() : nullptr, B64.const_data_ptr<double>(), W.size(0),
               W.size(1), A.size(0), scale, sign);
  });
}

void merge_lora_cpu(at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale) {
  merge_impl("merge_lora_", W, A, B, scale, 1.0);
}

void unmerge_lora_cpu(at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale) {
  merge_impl("unmerge_lora_", W, A, B, scale, -1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_lora_", &merge_lora_cpu);
  m.impl("unmerge_lora_", &unmerge_lora_cpu);
}

}  // namespace merge
}  // namespace lora_ext
