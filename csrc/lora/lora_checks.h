// Argument rules of the LoRA operators, shared by the CPU and CUDA glue.
#pragma once

#include <initializer_list>

#include "common/checks.h"

namespace lora_ext {
namespace lora {

struct LoraDims {
  int64_t M, K, N, r;
};

inline LoraDims check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                double dropout_p) {
  LORA_CHECK(x.dim() >= 1, op, ": input must have at least one dimension");
  LORA_CHECK(is_float_or_double(x.scalar_type()), op,
             ": input must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  LORA_CHECK(A.dim() == 2 && B.dim() == 2, op, ": lora_A must be (r, in_features) and lora_B (out_features, r), got ",
             A.sizes(), " and ", B.sizes());
  const int64_t r = A.size(0), K = x.size(-1);
  LORA_CHECK(r >= 1, op, ": rank r must be >= 1, got ", r);
  LORA_CHECK(A.size(1) == K, op, ": lora_A must be (r, ", K, ") for inputs with ", K, " features, got ", A.sizes());
  LORA_CHECK(B.size(1) == r, op, ": lora_B must be (out_features, ", r, ") to match lora_A's rank, got ", B.sizes());
  LORA_CHECK(A.scalar_type() == B.scalar_type(), op, ": lora_A and lora_B must share a dtype, got ", A.scalar_type(),
             " and ", B.scalar_type());
  LORA_CHECK(is_float_or_double(A.scalar_type()), op,
             ": adapter weights must be floating point, got ", A.scalar_type());
  check_same_device(A, x, "lora_A");
  check_same_device(B, x, "lora_B");
  LORA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout must be in [0, 1), got ", dropout_p);
  const int64_t M = leading_rows(x);
  return {M, K, B.size(0), r};
}

inline LoraDims check_forward_args(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& A,
                                   const at::Tensor& B, double dropout_p) {
  const auto d = check_lora_args("lora_forward", x, A, B, dropout_p);
  LORA_CHECK(base_out.dim() == x.dim() && base_out.size(-1) == d.N && base_out.numel() == d.M * d.N,
             "lora_forward: base output must have the input's leading dims and ", d.N, " features, got ",
             base_out.sizes(), " for input ", x.sizes());
  LORA_CHECK(is_float_or_double(base_out.scalar_type()), "lora_forward: base output must be floating point, got ",
             base_out.scalar_type());
  check_same_device(base_out, x, "lora_forward: base output");
  return d;
}

inline LoraDims check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& T,
                                    const at::Tensor& A, const at::Tensor& B, double dropout_p) {
  const auto d = check_lora_args("lora_backward", x, A, B, dropout_p);
  LORA_CHECK(grad_y.numel() == d.M * d.N, "lora_backward: grad_output must have ", d.M * d.N, " elements, got ",
             grad_y.sizes());
  LORA_CHECK(is_float_or_double(grad_y.scalar_type()), "lora_backward: grad_output must be floating point, got ",
             grad_y.scalar_type());
  LORA_CHECK(T.dim() == 2 && T.size(0) == d.M && T.size(1) == d.r, "lora_backward: T must be (", d.M, ", ", d.r,
             "), got ", T.sizes());
  check_same_device(grad_y, x, "lora_backward: grad_output");
  check_same_device(T, x, "lora_backward: T");
  LORA_CHECK(T.scalar_type() == A.scalar_type(), "lora_backward: T must be in lora_A's dtype (the forward's T), got ",
             T.scalar_type(), " for ", A.scalar_type());
  return d;
}

// The base layer's own input gradient, which lora_backward adds into dx.
inline void check_grad_x_base(const c10::optional<at::Tensor>& grad_x_base, const at::Tensor& x, const LoraDims& d,
                              const char* op = "lora_backward") {
  if (!grad_x_base.has_value()) return;
  const at::Tensor& g = *grad_x_base;
  LORA_CHECK(g.numel() == d.M * d.K, op, ": grad_x_base must have the input's ", d.M * d.K, " elements, got ",
             g.sizes());
  LORA_CHECK(is_float_or_double(g.scalar_type()), op, ": grad_x_base must be floating point, got ", g.scalar_type());
  LORA_CHECK(g.device() == x.device(), op, ": grad_x_base must be on ", x.device(), ", got ", g.device());
}

// The dtype the low-rank products are computed in: fp32 (whatever the activations and adapters are
// stored in), or fp64 when any operand is fp64 (gradcheck).
inline at::ScalarType compute_dtype(std::initializer_list<at::ScalarType> types) {
  for (const auto t : types)
    if (t == at::kDouble) return at::kDouble;
  return at::kFloat;
}

}  // namespace lora
}  // namespace lora_ext
