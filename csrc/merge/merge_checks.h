// Argument rules of merge_lora_ / unmerge_lora_: everything is checked before W is touched.
#pragma once

#include "common/checks.h"
#include "nf4/nf4_checks.h"

namespace lora_ext {
namespace merge {

inline void check_merge_args(const char* op, const at::Tensor& W, const at::Tensor& A, const at::Tensor& B) {
  check_float_type(W.scalar_type(), op);
  check_contiguous(W, op);
  LORA_CHECK(W.dim() == 2, op, ": W must be 2-D (out_features, in_features), got ", W.sizes());
  LORA_CHECK(A.dim() == 2 && B.dim() == 2, op, ": A must be (r, in_features) and B (out_features, r), got ",
             A.sizes(), " and ", B.sizes());
  LORA_CHECK(A.size(1) == W.size(1) && B.size(0) == W.size(0) && A.size(0) == B.size(1), op,
             ": A must be (r, ", W.size(1), ") and B (", W.size(0), ", r) for W of shape ", W.sizes(), ", got A ",
             A.sizes(), " and B ", B.sizes());
  LORA_CHECK(at::isFloatingType(A.scalar_type()) && at::isFloatingType(B.scalar_type()), op,
             ": A and B must be floating point, got ", A.scalar_type(), " and ", B.scalar_type());
  check_same_device(A, W, "A");
  check_same_device(B, W, "B");
}

// merge_nf4: the NF4 weight's own checks, then A (r x k) and B (d x r) on its device.
inline nf4::DequantArgs check_merge_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                             at::IntArrayRef shape, const at::Tensor& A, const at::Tensor& B,
                                             const c10::optional<at::Tensor>& nested_absmax,
                                             const c10::optional<at::Tensor>& nested_code,
                                             const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  LORA_CHECK(shape.size() == 2, "merge_nf4: the NF4 weight must be 2-D, got shape ", shape);
  const auto w = nf4::check_dequantize_args(packed, absmax, blocksize, shape, at::kFloat, nested_absmax, nested_code,
                                            offset, nested_blocksize);
  const int64_t d = shape[0], k = shape[1];
  LORA_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(1) == k && B.size(0) == d && A.size(0) == B.size(1),
             "merge_nf4: A must be (r, ", k, ") and B (", d, ", r) for a weight of shape (", d, ", ", k, "), got A ",
             A.sizes(), " and B ", B.sizes());
  LORA_CHECK(at::isFloatingType(A.scalar_type()) && at::isFloatingType(B.scalar_type()),
             "merge_nf4: A and B must be floating point, got ", A.scalar_type(), " and ", B.scalar_type());
  check_same_device(A, packed, "merge_nf4: A");
  check_same_device(B, packed, "merge_nf4: B");
  return w;
}

}  // namespace merge
}  // namespace lora_ext
