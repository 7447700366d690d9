// Argument checks shared by the CPU and CUDA host glue. Each message names what was expected
// and what was given; a failed check throws before any output is written.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define LORA_CHECK(cond, ...) TORCH_CHECK((cond), "lora_ext: ", __VA_ARGS__)

namespace lora_ext {

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

inline int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// float64 too: accepted where gradcheck runs the ops.
inline bool is_float_or_double(at::ScalarType t) { return is_float_type(t) || t == at::kDouble; }

// Rows of t seen as a matrix over its last dimension (the product of the leading dims).
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

inline void check_float_type(at::ScalarType t, const char* what) {
  LORA_CHECK(is_float_type(t), what, " must be float32, float16 or bfloat16, got ", t);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* what) {
  LORA_CHECK(t.scalar_type() == expected, what, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_numel(const at::Tensor& t, int64_t expected, const char* what) {
  LORA_CHECK(t.numel() == expected, what, " must have ", expected, " elements, got ", t.numel(),
             " (shape ", t.sizes(), ")");
}

inline void check_contiguous(const at::Tensor& t, const char* what) {
  LORA_CHECK(t.is_contiguous(), what, " must be contiguous (got strides ", t.strides(), ")");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  LORA_CHECK(t.device() == ref.device(), what, " must be on ", ref.device(), ", got ", t.device());
}

}  // namespace lora_ext
