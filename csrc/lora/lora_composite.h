// LoRA forward and backward built from the device's dropout kernel and BLAS (cuBLAS / MKL) for the
// skinny products. Included by the CPU and the CUDA glue with their own dropout function.
//
// forward:  T = dropout(x) A^T (M x r, in the adapters' dtype, fp32 accumulation),
//           y = base_out + s T B^T
// backward: dT = s dy B, dB = s dy^T T, dA = dT^T dropout(x), dx = dropout'(dT A)
// dropout(x) is regenerated from (seed, element index), never stored.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lora/lora_checks.h"
#include "lora/lora_common.h"

namespace lora_ext {
namespace lora {

// DropoutFn: at::Tensor(const at::Tensor& contiguous_2d, const DropoutSpec&)
template <typename DropoutFn>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& A,
                                                const at::Tensor& B, double scale, double dropout_p, int64_t seed,
                                                DropoutFn dropout) {
  const auto d = check_lora_args("lora_forward", x, A, B, dropout_p);
  LORA_CHECK(base_out.dim() == x.dim() && base_out.size(-1) == d.N && base_out.numel() == d.M * d.N,
             "lora_forward: base output must have the input's leading dims and ", d.N, " features, got ",
             base_out.sizes(), " for input ", x.sizes());
  check_same_device(base_out, x, "lora_forward: base output");
  const at::ScalarType cdt = A.scalar_type();
  at::Tensor xd = x.reshape({d.M, d.K});
  if (dropout_p > 0.0) xd = dropout(xd.contiguous(), dropout_spec(dropout_p, static_cast<uint64_t>(seed)));
  const at::Tensor T = at::mm(xd.to(cdt), A.t());
  const at::Tensor base2 = base_out.reshape({d.M, d.N});
  at::Tensor y;
  if (base_out.scalar_type() == cdt) {
    y = at::addmm(base2, T, B.t(), 1.0, scale);
  } else {
    y = base2 + at::mm(T, B.t()).mul_(scale).to(base_out.scalar_type());
  }
  return {y.view(base_out.sizes()), T};
}

template <typename DropoutFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& T, const at::Tensor& A,
                                                             const at::Tensor& B, double scale, double dropout_p,
                                                             int64_t seed, DropoutFn dropout) {
  const auto d = check_lora_args("lora_backward", x, A, B, dropout_p);
  LORA_CHECK(grad_y.numel() == d.M * d.N, "lora_backward: grad_output must have ", d.M * d.N, " elements, got ",
             grad_y.sizes());
  LORA_CHECK(T.dim() == 2 && T.size(0) == d.M && T.size(1) == d.r, "lora_backward: T must be (", d.M, ", ", d.r,
             "), got ", T.sizes());
  const at::ScalarType cdt = A.scalar_type();
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).to(cdt);
  const at::Tensor dT = at::mm(dy, B).mul_(scale);
  const at::Tensor dB = at::mm(dy.t(), T.to(cdt)).mul_(scale);
  const DropoutSpec spec = dropout_spec(dropout_p, static_cast<uint64_t>(seed));
  at::Tensor xd = x.reshape({d.M, d.K});
  if (dropout_p > 0.0) xd = dropout(xd.contiguous(), spec);
  const at::Tensor dA = at::mm(dT.t(), xd.to(cdt));
  at::Tensor dx = at::mm(dT, A);
  if (dropout_p > 0.0) dx = dropout(dx, spec);
  return {dx.to(x.scalar_type()).view(x.sizes()), dA, dB};
}

}  // namespace lora
}  // namespace lora_ext
