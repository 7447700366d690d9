// Argument rules of the DoRA operators, shared by the CPU and CUDA glue: the LoRA branch's (lora_checks.h)
// plus DoRA's column scale g and bias.
#pragma once

#include "lora/lora_checks.h"

namespace lora_ext {
namespace dora {

using lora::LoraDims;

// A per-output-feature vector (g, bias): N floating-point values on x's device.
inline void check_column_vector(const char* op, const at::Tensor& v, const at::Tensor& x, int64_t N,
                                const char* what) {
  LORA_CHECK(v.dim() == 1 && v.size(0) == N && is_float_or_double(v.scalar_type()), op, ": ", what,
             " must be a floating-point vector of the ", N, " output features, got ", v.scalar_type(), " of shape ",
             v.sizes());
  LORA_CHECK(v.device() == x.device(), op, ": ", what, " must be on ", x.device(), ", got ", v.device());
}

// base_out: x W^T without the bias, the input's leading dims and N features, on x's device.
inline void check_base_out(const char* op, const at::Tensor& base_out, const at::Tensor& x, const LoraDims& d) {
  LORA_CHECK(base_out.dim() == x.dim() && base_out.size(-1) == d.N && base_out.numel() == d.M * d.N, op,
             ": base output must have the input's leading dims and ", d.N, " features, got ", base_out.sizes(),
             " for input ", x.sizes());
  LORA_CHECK(is_float_or_double(base_out.scalar_type()), op, ": base output must be floating point, got ",
             base_out.scalar_type());
  LORA_CHECK(base_out.device() == x.device(), op, ": base output must be on ", x.device(), ", got ",
             base_out.device());
}

inline LoraDims check_forward_args(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& g, const c10::optional<at::Tensor>& bias) {
  const char* op = "dora_forward";
  const LoraDims d = lora::check_lora_args(op, x, A, B, 0.0);
  check_base_out(op, base_out, x, d);
  check_column_vector(op, g, x, d.N, "g (magnitude / weight norm)");
  if (bias.has_value()) check_column_vector(op, *bias, x, d.N, "bias");
  return d;
}

inline LoraDims check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& base_out,
                                    const at::Tensor& T, const at::Tensor& A, const at::Tensor& B, const at::Tensor& g,
                                    const c10::optional<at::Tensor>& grad_x_base) {
  const char* op = "dora_backward";
  const LoraDims d = lora::check_lora_args(op, x, A, B, 0.0);
  LORA_CHECK(grad_y.numel() == d.M * d.N && is_float_or_double(grad_y.scalar_type()), op,
             ": grad_output must be floating point with ", d.M * d.N, " elements, got ", grad_y.scalar_type(),
             " of shape ", grad_y.sizes());
  LORA_CHECK(grad_y.device() == x.device(), op, ": grad_output must be on ", x.device(), ", got ", grad_y.device());
  check_base_out(op, base_out, x, d);
  LORA_CHECK(T.dim() == 2 && T.size(0) == d.M && T.size(1) == d.r && T.device() == x.device(), op, ": T must be (",
             d.M, ", ", d.r, ") on ", x.device(), ", got ", T.sizes(), " on ", T.device());
  LORA_CHECK(T.scalar_type() == A.scalar_type(), op, ": T must be in lora_A's dtype (the forward's T), got ",
             T.scalar_type(), " for ", A.scalar_type());
  check_column_vector(op, g, x, d.N, "g (magnitude / weight norm)");
  lora::check_grad_x_base(grad_x_base, x, d, op);
  return d;
}

// A (r x K) and a dense weight (N x K), floating point, on one device.
inline void check_a_times_w_t_args(const at::Tensor& A, const at::Tensor& weight) {
  const char* op = "dora_a_times_w_t";
  LORA_CHECK(A.dim() == 2 && weight.dim() == 2 && A.size(1) == weight.size(1), op,
             ": lora_A must be (r, in_features) and the weight (out_features, in_features), got ", A.sizes(), " and ",
             weight.sizes());
  LORA_CHECK(is_float_or_double(A.scalar_type()) && is_float_or_double(weight.scalar_type()), op,
             ": lora_A and the weight must be floating point, got ", A.scalar_type(), " and ", weight.scalar_type());
  LORA_CHECK(weight.device() == A.device(), op, ": the weight must be on ", A.device(), ", got ", weight.device());
}

// dora_weight_norm(_from_a_w_t): A (r x K), B (N x r), w_sq (N) and `other` (the weight, N x K, or
// a_w_t = A W^T, r x N), floating point, on A's device.
inline void check_weight_norm_args(const char* op, const at::Tensor& A, const at::Tensor& B, const at::Tensor& other,
                                   bool other_is_weight, const at::Tensor& w_sq) {
  LORA_CHECK(A.dim() == 2 && B.dim() == 2 && B.size(1) == A.size(0), op,
             ": lora_A must be (r, in_features) and lora_B (out_features, r), got ", A.sizes(), " and ", B.sizes());
  const int64_t r = A.size(0), N = B.size(0);
  if (other_is_weight) {
    LORA_CHECK(other.dim() == 2 && other.size(0) == N && other.size(1) == A.size(1), op, ": the weight must be (",
               N, ", ", A.size(1), "), got ", other.sizes());
  } else {
    LORA_CHECK(other.dim() == 2 && other.size(0) == r && other.size(1) == N, op, ": a_w_t (A W^T) must be (", r,
               ", ", N, "), got ", other.sizes());
  }
  LORA_CHECK(w_sq.dim() == 1 && w_sq.size(0) == N, op, ": w_sq (the squared row norms of W) must be a vector of the ",
             N, " output features, got shape ", w_sq.sizes());
  for (const at::Tensor* t : {&A, &B, &other, &w_sq}) {
    LORA_CHECK(is_float_or_double(t->scalar_type()), op, ": every argument must be floating point, got ",
               A.scalar_type(), ", ", B.scalar_type(), ", ", other.scalar_type(), " and ", w_sq.scalar_type());
    LORA_CHECK(t->device() == A.device(), op, ": every argument must be on lora_A's device ", A.device(), ", got ",
               t->device());
  }
}

// dora_scaled_grad: grad_y (..., N) and g (N), floating point, on one device.
inline void check_scaled_grad_args(const at::Tensor& grad_y, const at::Tensor& g) {
  const char* op = "dora_scaled_grad";
  LORA_CHECK(grad_y.dim() >= 1 && is_float_or_double(grad_y.scalar_type()), op,
             ": grad_output must be floating point with at least one dimension, got ", grad_y.scalar_type(),
             " of shape ", grad_y.sizes());
  check_column_vector(op, g, grad_y, grad_y.size(-1), "g (magnitude / weight norm)");
}

}  // namespace dora
}  // namespace lora_ext
