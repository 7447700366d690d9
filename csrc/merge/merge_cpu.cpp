// In-place merge / unmerge on the CPU: each row of W is read and written once; its delta is
// accumulated in fp64 in a per-thread row buffer (merge_common.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/dispatch.h"
#include "merge/merge_checks.h"
#include "merge/merge_common.h"

namespace lora_ext {
namespace merge {
namespace {

template <typename T>
void merge_rows(T* W, const double* A, const double* B, int64_t d, int64_t k, int64_t r, double scale, double sign) {
  at::parallel_for(0, d, std::max<int64_t>(1, 4096 / std::max<int64_t>(k / 64, 1)), [&](int64_t i0, int64_t i1) {
    std::vector<double> acc(static_cast<size_t>(k));
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < r; ++j) {
        const double b = B[i * r + j];
        const double* a = A + j * k;
        for (int64_t c = 0; c < k; ++c) acc[c] = dadd(acc[c], dmul(b, a[c]));
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
