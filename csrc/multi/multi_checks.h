// Argument rules of multi_lora_forward_, shared by the CPU and CUDA glue. The shape, dtype and device
// rules hold on every device; the plan's values (rows, tiles) are read and checked on the CPU only: on
// CUDA that would cost a device sync per layer, and the kernels skip what is out of range instead.
#pragma once

#include <vector>

#include "common/checks.h"
#include "multi/multi_launch.h"

namespace lora_ext {
namespace multi {

struct MultiDims {
  int64_t M, K, N, n_adapters, r_max;
};

inline MultiDims check_multi_args(const at::Tensor& y, const at::Tensor& x, at::TensorList A, at::TensorList B,
                                  at::ArrayRef<double> scales, const at::Tensor& rows, const at::Tensor& tiles) {
  constexpr const char* op = "multi_lora_forward_";
  LORA_CHECK(x.dim() >= 1 && y.dim() >= 1, op, ": input and output must have at least one dimension, got ",
             x.sizes(), " and ", y.sizes());
  LORA_CHECK(is_float_or_double(x.scalar_type()) && is_float_or_double(y.scalar_type()), op,
             ": input and output must be float32, float16, bfloat16 or float64, got ", x.scalar_type(), " and ",
             y.scalar_type());
  const int64_t M = leading_rows(x), K = x.size(-1), N = y.size(-1);
  LORA_CHECK(leading_rows(y) == M, op, ": the output must have a row per row of the input (", M, "), got ",
             y.sizes(), " for input ", x.sizes());
  LORA_CHECK(y.is_contiguous(), op, ": the output is updated in place and must be contiguous, got strides ",
             y.strides());
  check_same_device(y, x, "multi_lora_forward_: output");
  LORA_CHECK(A.size() == B.size() && A.size() == scales.size(), op,
             ": lora_A, lora_B and scales must have one entry per adapter, got ", A.size(), ", ", B.size(), " and ",
             scales.size());
  int64_t r_max = 0;
  for (size_t i = 0; i < A.size(); ++i) {
    const at::Tensor &a = A[i], &b = B[i];
    LORA_CHECK(a.dim() == 2 && a.size(1) == K, op, ": lora_A[", i, "] must be (r, ", K, "), got ", a.sizes());
    LORA_CHECK(b.dim() == 2 && b.size(0) == N && b.size(1) == a.size(0), op, ": lora_B[", i, "] must be (", N, ", ",
               a.size(0), ") to match the output and lora_A[", i, "], got ", b.sizes());
    LORA_CHECK(is_float_or_double(a.scalar_type()) && is_float_or_double(b.scalar_type()), op, ": adapter ", i,
               " must be floating point, got ", a.scalar_type(), " and ", b.scalar_type());
    check_same_device(a, x, "multi_lora_forward_: lora_A");
    check_same_device(b, x, "multi_lora_forward_: lora_B");
    r_max = std::max(r_max, a.size(0));
  }
  LORA_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, op,
             ": rows must be a 1-D int64 tensor (sorted position -> row), got ", rows.scalar_type(), " of shape ",
             rows.sizes());
  LORA_CHECK(tiles.dim() == 2 && tiles.size(1) == 3 && tiles.scalar_type() == at::kInt, op,
             ": tiles must be an int32 tensor of shape (n, 3): adapter, first position, count; got ",
             tiles.scalar_type(), " of shape ", tiles.sizes());
  LORA_CHECK(rows.numel() <= M, op, ": rows has ", rows.numel(), " entries for ", M, " rows");
  check_same_device(rows, x, "multi_lora_forward_: rows");
  check_same_device(tiles, x, "multi_lora_forward_: tiles");
  return {M, K, N, static_cast<int64_t>(A.size()), r_max};
}

// The plan's values, on the CPU: rows distinct and in [0, M); each tile's adapter in range and its
// positions inside rows, no position in two tiles.
inline void check_plan_values(const at::Tensor& rows, const at::Tensor& tiles, const MultiDims& d) {
  constexpr const char* op = "multi_lora_forward_";
  const at::Tensor r = rows.contiguous(), t = tiles.contiguous();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  const int32_t* tp = t.const_data_ptr<int32_t>();
  const int64_t n_sorted = r.numel();
  std::vector<bool> seen(static_cast<size_t>(d.M), false), covered(static_cast<size_t>(n_sorted), false);
  for (int64_t i = 0; i < n_sorted; ++i) {
    LORA_CHECK(rp[i] >= 0 && rp[i] < d.M, op, ": rows[", i, "] = ", rp[i], " is not a row of the ", d.M,
               "-row input");
    LORA_CHECK(!seen[rp[i]], op, ": row ", rp[i], " is listed twice in rows");
    seen[rp[i]] = true;
  }
  for (int64_t i = 0; i < t.size(0); ++i) {
    const int64_t a = tp[3 * i], start = tp[3 * i + 1], count = tp[3 * i + 2];
    LORA_CHECK(a >= 0 && a < d.n_adapters, op, ": tiles[", i, "]: adapter must be in [0, ", d.n_adapters,
               "), got ", a);
    LORA_CHECK(start >= 0 && count >= 1 && start + count <= n_sorted, op, ": tiles[", i,
               "]: must cover positions inside rows' ", n_sorted, " (first >= 0, count >= 1), got [", start, ", ",
               start + count, ")");
    for (int64_t p = start; p < start + count; ++p) {
      LORA_CHECK(!covered[p], op, ": position ", p, " of rows is in two tiles");
      covered[p] = true;
    }
  }
}

}  // namespace multi
}  // namespace lora_ext
