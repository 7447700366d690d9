// The whole DoRA layer over a frozen base (dora_linear: dense W; dora_nf4_linear: NF4 W), for every
// device: the base product without its bias, then dora_forward on it. It returns that product too
// (base_out), which its backward (lora_ext/ops.py) keeps for dg; the backward hands the base's dx,
// (g dy) W, to dora_backward as grad_x_base, so dx is written once.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "dora/dora_composite.h"
#include "nf4/nf4_linear_call.h"

namespace lora_ext {
namespace dora {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple dora_forward(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& g, const OptTensor& bias, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::dora_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const OptTensor&, double)>();
  auto [y, T] = op.call(x, base_out, A, B, g, bias, scale);
  return {y, T, base_out};
}

Triple dora_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& g, double scale) {
  LORA_CHECK(is_float_or_double(x.scalar_type()),  // before at::linear, whose message names no argument
             "dora_linear: input must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  LORA_CHECK(weight.dim() == 2 && x.dim() >= 1 && weight.size(1) == x.size(-1),
             "dora_linear: weight must be (out_features, ", x.dim() >= 1 ? x.size(-1) : 0, "), got ", weight.sizes());
  return dora_forward(x, at::linear(x, weight), A, B, g, bias, scale);
}

Triple dora_nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t out_features,
                       int64_t blocksize, const OptTensor& bias, const OptTensor& nested_absmax,
                       const OptTensor& nested_code, const OptTensor& offset, int64_t nested_blocksize,
                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& g, double scale) {
  const at::Tensor base = nf4::call_nf4_linear(x, packed, absmax, out_features, blocksize, c10::nullopt,
                                               nested_absmax, nested_code, offset, nested_blocksize);
  return dora_forward(x, base, A, B, g, bias, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CompositeExplicitAutograd, m) {
  m.impl("dora_linear", &dora_linear);
  m.impl("dora_nf4_linear", &dora_nf4_linear);
  m.impl("dora_a_times_w_t", &a_times_w_t_blocks);  // the CPU has a kernel of its own (dora_cpu.cpp)
  m.impl("dora_weight_norm", &weight_norm_impl);  // the CPU has kernels of its own (dora_norm_cpu.cpp)
  m.impl("dora_weight_norm_from_a_w_t", &weight_norm_from_a_w_t_impl);
  m.impl("dora_scaled_grad", &scaled_grad_impl);  // the CPU has a kernel of its own (dora_cpu.cpp)
}

}  // namespace dora
}  // namespace lora_ext
