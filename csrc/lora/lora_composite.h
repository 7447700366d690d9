// LoRA forward and backward built from the device's dropout kernel and its products: the CPU kernel of
// lora_gemm_cpu.h for fp32 products, else BLAS (MKL / cuBLAS). This is the CPU operator, and the CUDA one
// for fp64. It has the semantics of the CUDA kernels in
// lora_gemm_cuda.cu: the products are computed in fp32 (fp64 if any operand is fp64) from the stored
// activations and adapters, and dropout scales the fp32 value. Each output is rounded once to its
// dtype: y and dx to the activations', T, dA and dB to the adapters'.
//
// forward:  T = dropout(x) A^T (M x r), y = base_out + s T B^T
// backward: dT = s dy B, dB = s dy^T T, dA = dT^T dropout(x), dx = dropout'(dT A) [+ grad_x_base]
// dropout(x) is regenerated from (seed, element index), never stored.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "common/no_autocast.h"
#include "common/scratch.h"
#include "lora/lora_checks.h"
#include "lora/lora_common.h"
#include "lora/lora_gemm_cpu.h"

namespace lora_ext {
namespace lora {

// base + scale * (a b), as the CUDA kernels (and the reference) compute it whatever the scale. BLAS does not: it
// skips the product when alpha is 0 (also a scale that rounds to 0 in fp32), dropping the branch's NaN/Inf, and a
// NaN or Inf alpha reaches the output or not depending on the shape. Only a finite, nonzero scale takes addmm.
inline at::Tensor add_scaled_product(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b, double scale) {
  const float scale32 = static_cast<float>(scale);
  return std::isfinite(scale32) && scale32 != 0.0f ? at::addmm(base, a, b, 1.0, scale)
                                                   : base.add(at::mm(a, b).mul_(scale));
}

// The same, into `base` (a copy the caller owns): no new tensor.
inline void add_scaled_product_(at::Tensor& base, const at::Tensor& a, const at::Tensor& b, double scale) {
  const float scale32 = static_cast<float>(scale);
  if (std::isfinite(scale32) && scale32 != 0.0f) {
    base.addmm_(a, b, 1.0, scale);
  } else {
    base.add_(at::mm(a, b).mul_(scale));
  }
}

// base.t = base + scale * (a b): in place when base.t is a copy (converted operands, common/scratch.h), else
// a new tensor; either way base.t is then the caller's to overwrite.
inline void add_scaled_product_into(Converted& base, const at::Tensor& a, const at::Tensor& b, double scale) {
  if (base.copy) {
    add_scaled_product_(base.t, a, b, scale);
  } else {
    base = {add_scaled_product(base.t, a, b, scale), true, false};
  }
}

// base + scale * (a b) in `dtype`, never aliasing the scratch buffers.
inline at::Tensor scaled_product_into(Converted& base, const at::Tensor& a, const at::Tensor& b, double scale,
                                      at::ScalarType dtype) {
  add_scaled_product_into(base, a, b, scale);
  return take(base, dtype);
}

// alpha a b (a: M x K, b: K x N) in the compute dtype: the CPU kernel (lora_gemm_cpu.h) for fp32, which reads
// a and b in their own dtypes; else BLAS.
inline at::Tensor product(const at::Tensor& a, const at::Tensor& b, double alpha, at::ScalarType cdt) {
  if (lowrank_gemm_cpu_applies(a, cdt)) {
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
    lowrank_gemm_cpu(a, b, {}, out, static_cast<float>(alpha));
    return out;
  }
  at::Tensor out = at::mm(a.to(cdt), b.to(cdt));
  return alpha == 1.0 ? out : out.mul_(alpha);
}

// alpha P Q [+ addend] [* col_scale + col_bias] (P: M x r, Q: r x N) in out_like's dtype, by the CPU kernel;
// undefined where that does not apply (CUDA, fp64, an addend of another dtype), for the caller's BLAS path.
// The addend (M x N, or undefined) is read in its own dtype.
inline at::Tensor up_product_or_undefined(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& addend,
                                          const at::Tensor& out_like, at::ScalarType cdt, double alpha,
                                          const float* col_scale = nullptr, const float* col_bias = nullptr) {
  if (!lowrank_gemm_cpu_applies(out_like, cdt) ||
      (addend.defined() && addend.scalar_type() != out_like.scalar_type())) {
    return {};
  }
  at::Tensor out = at::empty({P.size(0), Q.size(1)}, out_like.options().memory_format(at::MemoryFormat::Contiguous));
  lowrank_gemm_cpu(P, Q, addend.defined() ? addend.contiguous() : addend, out,
                   static_cast<float>(alpha), col_scale, col_bias);
  return out;
}

// dx = dT A [+ grad_x_base] (no dropout) in x's dtype, in one pass over dx: the CPU kernel, else BLAS.
inline at::Tensor dx_without_dropout(const at::Tensor& dT, const at::Tensor& A,
                                     const c10::optional<at::Tensor>& grad_x_base, const at::Tensor& x,
                                     const LoraDims& d, at::ScalarType cdt) {
  const at::Tensor addend = grad_x_base.has_value() ? grad_x_base->reshape({d.M, d.K}) : at::Tensor();
  const at::Tensor dx = up_product_or_undefined(dT, A, addend, x, cdt, 1.0);
  if (dx.defined()) return dx;
  if (!addend.defined()) return at::mm(dT, A.to(cdt)).to(x.scalar_type());
  Converted dx_base = convert(addend, cdt, 2);
  return scaled_product_into(dx_base, dT, A.to(cdt), 1.0, x.scalar_type());
}

// DropoutFn: at::Tensor(const at::Tensor& contiguous_2d, const DropoutSpec&)
template <typename DropoutFn>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& A,
                                                const at::Tensor& B, double scale, double dropout_p, int64_t seed,
                                                DropoutFn dropout) {
  const ExactProducts exact_products;
  const auto d = check_forward_args(x, base_out, A, B, dropout_p);
  const at::ScalarType cdt = compute_dtype({x.scalar_type(), base_out.scalar_type(), A.scalar_type()});
  at::Tensor xd = x.reshape({d.M, d.K});
  if (dropout_p > 0.0) {
    xd = dropout(convert(xd, cdt, 0).t.contiguous(), dropout_spec(dropout_p, static_cast<uint64_t>(seed)));
  }
  const at::Tensor T = product(xd, A.t(), 1.0, cdt);
  const at::Tensor y_up = up_product_or_undefined(T, B.t(), base_out.reshape({d.M, d.N}), base_out, cdt, scale);
  if (y_up.defined()) return {y_up.view(base_out.sizes()), T.to(A.scalar_type())};
  Converted base = convert(base_out.reshape({d.M, d.N}), cdt, 1);
  const at::Tensor y = scaled_product_into(base, T, B.to(cdt).t(), scale, base_out.scalar_type());
  return {y.view(base_out.sizes()), T.to(A.scalar_type())};
}

template <typename DropoutFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& T, const at::Tensor& A,
                                                             const at::Tensor& B, double scale, double dropout_p,
                                                             int64_t seed, const c10::optional<at::Tensor>& grad_x_base,
                                                             DropoutFn dropout) {
  const ExactProducts exact_products;
  const auto d = check_backward_args(grad_y, x, T, A, B, dropout_p);
  check_grad_x_base(grad_x_base, x, d);
  const at::ScalarType cdt = compute_dtype({grad_y.scalar_type(), x.scalar_type(), A.scalar_type()});
  const at::Tensor dy = grad_y.reshape({d.M, d.N});
  const at::Tensor dT = product(dy, B, scale, cdt);
  const at::Tensor dB = product(T.t(), dy, scale, cdt).t();
  const DropoutSpec spec = dropout_spec(dropout_p, static_cast<uint64_t>(seed));
  const at::Tensor x2 = x.reshape({d.M, d.K});
  const at::Tensor dA = product(dT.t(), dropout_p > 0.0 ? dropout(convert(x2, cdt, 1).t.contiguous(), spec) : x2,
                                1.0, cdt);
  at::Tensor dx;
  if (dropout_p == 0.0) {
    dx = dx_without_dropout(dT, A, grad_x_base, x, d, cdt);
  } else {
    dx = dropout(at::mm(dT, A.to(cdt)), spec);
    if (grad_x_base.has_value()) dx.add_(convert(grad_x_base->reshape({d.M, d.K}), cdt, 2).t);
    dx = dx.to(x.scalar_type());
  }
  return {dx.view(x.sizes()), dA.to(A.scalar_type()), dB.to(B.scalar_type()).contiguous()};
}

}  // namespace lora
}  // namespace lora_ext
