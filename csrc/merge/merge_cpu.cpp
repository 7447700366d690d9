// In-place merge / unmerge on the CPU: each row of W is read and written once; its delta is
// accumulated in fp64 in a per-thread row buffer (merge_common.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "merge/merge_checks.h"
#include "merge/merge_common.h"

namespace lora_ext {
namespace merge {
namespace {

#if defined(LORA_EXT_X86_SIMD)
// Rows [i0, i0 + 4) x columns [c0, c0 + 8): 8 fp64 accumulators in registers, each A value loaded
// once for four rows. Multiply and add stay separate (no FMA), so the sums equal the scalar loop's.
__attribute__((target("avx2"))) void tile_4x8(const double* A, const double* B, int64_t i0, int64_t c0, int64_t k,
                                               int64_t r, double out[4][8]) {
  __m256d acc[4][2];
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
  for (int64_t j = 0; j < r; ++j) {
    const __m256d a0 = _mm256_loadu_pd(A + j * k + c0), a1 = _mm256_loadu_pd(A + j * k + c0 + 4);
    for (int i = 0; i < 4; ++i) {
      const __m256d b = _mm256_set1_pd(B[(i0 + i) * r + j]);
      acc[i][0] = _mm256_add_pd(acc[i][0], _mm256_mul_pd(b, a0));
      acc[i][1] = _mm256_add_pd(acc[i][1], _mm256_mul_pd(b, a1));
    }
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_pd(out[i], acc[i][0]);
    _mm256_storeu_pd(out[i] + 4, acc[i][1]);
  }
}
#endif

template <typename T>
void merge_rows(T* W, const double* A, const double* B, int64_t d, int64_t k, int64_t r, double scale, double sign) {
  at::parallel_for(0, d, std::max<int64_t>(1, 4096 / std::max<int64_t>(k / 64, 1)), [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(LORA_EXT_X86_SIMD)
    if (x86_simd_enabled()) {
      double tile[4][8];
      for (; i + 4 <= i1; i += 4) {
        int64_t c = 0;
        for (; c + 8 <= k; c += 8) {
          tile_4x8(A, B, i, c, k, r, tile);
          for (int ii = 0; ii < 4; ++ii) {
            T* w = W + (i + ii) * k + c;
            for (int cc = 0; cc < 8; ++cc)
              w[cc] = static_cast<T>(merged_value(static_cast<double>(static_cast<float>(w[cc])), scale, tile[ii][cc], sign));
          }
        }
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
  LORA_DISPATCH_FLOAT_TYPES(W.scalar_type(), "merge_lora_cpu", [&] {
    merge_rows(W.data_ptr<scalar_t>(), A64.const_data_ptr<double>(), B64.const_data_ptr<double>(), W.size(0),
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
