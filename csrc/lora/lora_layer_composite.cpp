// The whole LoRA layer over a frozen base (lora_linear: dense W; lora_nf4_linear: NF4 W), for every
// device: the base product, then lora_forward on its output. What makes it one operator is the
// backward (lora_ext/ops.py): a single autograd node that passes the base's dx to lora_backward as
// grad_x_base, so the kernel's dx epilogue writes the layer's dx in one pass.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "nf4/nf4_linear_call.h"

namespace lora_ext {
namespace lora {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = c10::optional<at::Tensor>;

Pair lora_forward(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& A, const at::Tensor& B,
                  double scale, double dropout_p, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_forward", "")
                             .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, double, int64_t)>();
  return op.call(x, base_out, A, B, scale, dropout_p, seed);
}

Pair lora_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                 const at::Tensor& B, double scale, double dropout_p, int64_t seed) {
  LORA_CHECK(is_float_or_double(x.scalar_type()),  // before at::linear, whose message names no argument
             "lora_linear: input must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  LORA_CHECK(weight.dim() == 2 && x.dim() >= 1 && weight.size(1) == x.size(-1),
             "lora_linear: weight must be (out_features, ", x.dim() >= 1 ? x.size(-1) : 0, "), got ", weight.sizes());
  // as nf4_linear's: at::linear would broadcast another shape, or fail with a message that names no argument
  LORA_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_floating_point()),
             "lora_linear: bias must be floating point of shape (", weight.size(0), ",), got ", bias->scalar_type(),
             " of shape ", bias->sizes());
  return lora_forward(x, at::linear(x, weight, bias), A, B, scale, dropout_p, seed);
}

Pair lora_nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t out_features,
                     int64_t blocksize, const OptTensor& bias, const OptTensor& nested_absmax,
                     const OptTensor& nested_code, const OptTensor& offset, int64_t nested_blocksize,
                     const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p, int64_t seed) {
  const at::Tensor base = nf4::call_nf4_linear(x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                               nested_code, offset, nested_blocksize);
  return lora_forward(x, base, A, B, scale, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_nf4_linear", &lora_nf4_linear);
}

}  // namespace lora
}  // namespace lora_ext
