// DoRA's forward and backward built from the LoRA products (lora_composite.h: the CPU kernel for fp32,
// else BLAS) and a column-dot function: the CPU operators, and the CUDA ones for fp64. The semantics of the
// CUDA path (dora_cuda_api.cpp): products in fp32 (fp64 if any operand is fp64) from the stored values, each
// output rounded once to its dtype.
//
// forward:  T = x A^T, y = g * (base_out + s T B^T) + bias          (base_out = x W^T, no bias)
// backward: with B_g = g * B (row j times g_j), the LoRA backward on dy and B_g:
//           dT = s dy B_g, dB' = s dy^T T, dA = dT^T x, dx = dT A [+ grad_x_base];
//           dB = g * dB', dg_j = sum_i dy_ij base_ij + sum_k dB'_jk B_jk   (= sum_i dy_ij (base + s T B^T)_ij)
// No division by g anywhere: a zero magnitude keeps finite gradients.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "common/no_autocast.h"
#include "dora/dora_checks.h"
#include "lora/lora_composite.h"

namespace lora_ext {
namespace dora {

inline std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& base_out,
                                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& g,
                                                       const c10::optional<at::Tensor>& bias, double scale) {
  const ExactProducts exact_products;
  const LoraDims d = check_forward_args(x, base_out, A, B, g, bias);
  const at::ScalarType cdt = lora::compute_dtype({x.scalar_type(), base_out.scalar_type(), A.scalar_type()});
  const at::Tensor T = lora::product(x.reshape({d.M, d.K}), A.t(), 1.0, cdt);
  if (lora::lowrank_gemm_cpu_applies(base_out, cdt)) {
    const at::Tensor g32 = g.to(at::kFloat).contiguous();
    const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor y = lora::up_product_or_undefined(T, B.t(), base_out.reshape({d.M, d.N}), base_out, cdt, scale,
                                                       g32.const_data_ptr<float>(),
                                                       bias32.defined() ? bias32.const_data_ptr<float>() : nullptr);
    return {y.view(base_out.sizes()), T.to(A.scalar_type())};
  }
  Converted z = convert(base_out.reshape({d.M, d.N}), cdt, 1);
  lora::add_scaled_product_into(z, T, B.to(cdt).t(), scale);
  z.t.mul_(g.to(cdt));
  if (bias.has_value()) z.t.add_(bias->to(cdt));
  return {take(z, base_out.scalar_type()).view(base_out.sizes()), T.to(A.scalar_type())};
}

// The column-dot kernels' operands: a and b contiguous in one float dtype (theirs when they share one, else fp32).
inline std::pair<at::Tensor, at::Tensor> column_dot_operands(const at::Tensor& a, const at::Tensor& b) {
  const bool same = a.scalar_type() == b.scalar_type() && is_float_type(a.scalar_type());
  return {(same ? a : a.to(at::kFloat)).contiguous(), (same ? b : b.to(at::kFloat)).contiguous()};
}

// ColumnDots: at::Tensor(const at::Tensor& a, const at::Tensor& b), a and b M x N: the fp32 sums over rows of
// a * b (N values); used when the products are fp32 (fp64 sums in ATen).
template <typename ColumnDots>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& T,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& g, double scale,
    const c10::optional<at::Tensor>& grad_x_base, ColumnDots column_dots) {
  const ExactProducts exact_products;
  const LoraDims d = check_backward_args(grad_y, x, base_out, T, A, B, g, grad_x_base);
  const at::ScalarType cdt =
      lora::compute_dtype({grad_y.scalar_type(), x.scalar_type(), base_out.scalar_type(), A.scalar_type()});
  const at::Tensor dy = grad_y.reshape({d.M, d.N});
  const at::Tensor gc = g.to(cdt).unsqueeze(1), Bc = B.to(cdt);
  const at::Tensor dT = lora::product(dy, Bc * gc, scale, cdt);
  const at::Tensor dB = lora::product(T.t(), dy, scale, cdt).t();  // dB' = dB / g, never divided
  const at::Tensor dA = lora::product(dT.t(), x.reshape({d.M, d.K}), 1.0, cdt);
  const at::Tensor dx = lora::dx_without_dropout(dT, A, grad_x_base, x, d, cdt);
  const at::Tensor base2 = base_out.reshape({d.M, d.N});
  const at::Tensor base_dots =
      cdt == at::kDouble ? (dy.to(cdt) * base2.to(cdt)).sum(0) : column_dots(dy, base2).to(cdt);
  const at::Tensor dg = base_dots + (dB * Bc).sum(1);
  return {dx.view(x.sizes()), dA.to(A.scalar_type()), (dB * gc).to(B.scalar_type()).contiguous(),
          dg.to(g.scalar_type())};
}

// A W^T (r x N) in fp32 (fp64 if either is fp64) from a dense weight in any float dtype: the weight
// converted a block of rows at a time, never whole (a weight-sized temporary is what DoRA's norm avoids).
constexpr int64_t kWeightBlockElements = int64_t{1} << 22;

inline at::Tensor a_times_w_t_blocks(const at::Tensor& A, const at::Tensor& weight) {
  const ExactProducts exact_products;
  check_a_times_w_t_args(A, weight);
  const at::ScalarType cdt = lora::compute_dtype({A.scalar_type(), weight.scalar_type()});
  const at::Tensor Ac = A.to(cdt);
  if (weight.scalar_type() == cdt) return at::mm(Ac, weight.t());
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty({A.size(0), N}, A.options().dtype(cdt));
  const int64_t step = std::max<int64_t>(1, kWeightBlockElements / std::max<int64_t>(1, K));
  for (int64_t i0 = 0; i0 < N; i0 += step) {
    const int64_t n = std::min(step, N - i0);
    out.narrow(1, i0, n).copy_(at::mm(Ac, weight.narrow(0, i0, n).to(cdt).t()));
  }
  return out;
}

// ||W + s B A|| per row in fp32 from A W^T and ||W_i||^2: the cross and quadratic terms as one addmm,
// (2s (A W^T)^T + s^2 B (A A^T)), then one row dot with B.
inline at::Tensor weight_norm_from_a_w_t_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& a_w_t,
                                              const at::Tensor& w_sq, double scale) {
  const ExactProducts exact_products;
  check_weight_norm_args("dora_weight_norm_from_a_w_t", A, B, a_w_t, false, w_sq);
  const at::Tensor A32 = A.to(at::kFloat), B32 = B.to(at::kFloat);
  const at::Tensor both = at::addmm(a_w_t.to(at::kFloat).t(), B32, at::mm(A32, A32.t()), 2.0 * scale, scale * scale);
  return (B32 * both).sum(1).add_(w_sq.to(at::kFloat)).clamp_min_(0.0).sqrt_();
}

// The same for a dense weight: its A W^T by dora_a_times_w_t (the CPU has a fused kernel, dora_norm_cpu.cpp).
inline at::Tensor weight_norm_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& weight,
                                   const at::Tensor& w_sq, double scale) {
  check_weight_norm_args("dora_weight_norm", A, B, weight, true, w_sq);
  static const auto a_times_w_t = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("lora_ext::dora_a_times_w_t", "")
                                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return weight_norm_from_a_w_t_impl(A, B, a_times_w_t.call(A.to(at::kFloat), weight), w_sq, scale);
}

// g * dy rounded once to dy's dtype: mul_out computes in the promoted dtype and writes dy's (one kernel on
// CUDA; the CPU has a kernel of its own, dora_cpu.cpp).
inline at::Tensor scaled_grad_impl(const at::Tensor& grad_y, const at::Tensor& g) {
  const NoAutocast no_autocast;
  check_scaled_grad_args(grad_y, g);
  at::Tensor out = at::empty(grad_y.sizes(), grad_y.options().memory_format(at::MemoryFormat::Contiguous));
  return at::mul_out(out, grad_y, g);
}

}  // namespace dora
}  // namespace lora_ext
