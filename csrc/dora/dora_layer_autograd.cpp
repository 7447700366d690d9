// The autograd of the one-operator DoRA layers (dora_linear, dora_nf4_linear) in C++, as for LoRA's
// (csrc/lora/lora_layer_autograd.cpp, which says why): one node whose backward hands the base's dx,
// (g dy) W, to dora_backward as grad_x_base.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/layer_autograd.h"

namespace lora_ext {
namespace dora {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (y, T, base_out)

namespace {

// g * dy in dy's dtype, computed in fp32 and rounded once: the dora_scaled_grad op, or with grad mode on (a
// backward with create_graph=True) the differentiable form, as that op has no autograd.
at::Tensor scaled_grad(const at::Tensor& grad_y, const at::Tensor& g) {
  if (at::GradMode::is_enabled()) return (grad_y * g).to(grad_y.scalar_type());
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::dora_scaled_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_y, g);
}

// Saved: x, base_out, T, A, B, g, then what the base's dx reads; the edge index of A (B's and g's follow).
void save_layer(AutogradContext* ctx, const at::Tensor& x, const Triple& out, const at::Tensor& A,
                const at::Tensor& B, const at::Tensor& g, const std::vector<at::Tensor>& base, double scale,
                int64_t a_edge) {
  std::vector<at::Tensor> saved = {x, std::get<2>(out), std::get<1>(out), A, B, g};
  saved.insert(saved.end(), base.begin(), base.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["a_edge"] = a_edge;
  ctx->mark_non_differentiable({std::get<1>(out), std::get<2>(out)});
  // Only y has a gradient: T's and base_out's stay undefined instead of zeros (base_out's are M x N)
  // allocated and filled at every backward.
  ctx->set_materialize_grads(false);
}

// One gradient per forward argument (n_args): x first, then A, B and g fourth, third and second from last.
variable_list layer_grads(AutogradContext* ctx, const at::Tensor& grad_y, const variable_list& saved,
                          const OptTensor& grad_x_base, size_t n_args) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_ext::dora_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, double, const OptTensor&)>();
  const auto grads = op.call(grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                             ctx->saved_data["scale"].toDouble(), grad_x_base);
  variable_list out(n_args);
  const auto a_edge = static_cast<size_t>(ctx->saved_data["a_edge"].toInt());
  if (ctx->needs_input_grad(0)) out[0] = std::get<0>(grads);
  if (ctx->needs_input_grad(a_edge)) out[n_args - 4] = std::get<1>(grads);
  if (ctx->needs_input_grad(a_edge + 1)) out[n_args - 3] = std::get<2>(grads);
  if (ctx->needs_input_grad(a_edge + 2)) out[n_args - 2] = std::get<3>(grads);
  return out;
}

}  // namespace

struct DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& A, const at::Tensor& B, const at::Tensor& g,
                               double scale) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lora_ext::dora_linear", "")
                               .typed<Triple(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
    const Triple out = call_below_autograd(op, x, weight, bias, A, B, g, scale);
    save_layer(ctx, x, out, A, B, g, {weight}, scale, 2 + present({bias}));
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return variable_list(7);
    OptTensor grad_x_base;
    // (g dy) W in dy's dtype: under autocast the forward's product ran in it.
    if (ctx->needs_input_grad(0)) {
      grad_x_base = at::matmul(scaled_grad(grad_y, saved[5]), saved[6].to(grad_y.scalar_type()));
    }
    return layer_grads(ctx, grad_y, saved, grad_x_base, 7);
  }
};

struct DoraNf4LinearFunction : public torch::autograd::Function<DoraNf4LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, int64_t out_features, int64_t blocksize, const OptTensor& bias,
                               const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                               int64_t nested_blocksize, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& g, double scale) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lora_ext::dora_nf4_linear", "")
            .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, const OptTensor&,
                          const OptTensor&, const OptTensor&, const OptTensor&, int64_t, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, double)>();
    const Triple out = call_below_autograd(op, x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                                nested_code, offset, nested_blocksize, A, B, g, scale);
    save_layer(ctx, x, out, A, B, g,
               nf4_state_to_save(ctx, packed, absmax, blocksize, nested_absmax, nested_code, offset, nested_blocksize),
               scale, 3 + present({bias, nested_absmax, nested_code, offset}));
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return variable_list(14);
    OptTensor grad_x_base;
    if (ctx->needs_input_grad(0)) {
      grad_x_base = nf4_grad_input(ctx, saved, 6, scaled_grad(grad_y, saved[5]), saved[0].size(-1));
    }
    return layer_grads(ctx, grad_y, saved, grad_x_base, 14);
  }
};

namespace {

Triple dora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& g, double scale) {
  refuse_trainable_base({weight, bias}, "dora_linear", "dora_forward");
  const variable_list out = DoraLinearFunction::apply(x, weight, bias, A, B, g, scale);
  return {out[0], out[1], out[2]};
}

Triple dora_nf4_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t out_features, int64_t blocksize, const OptTensor& bias,
                                const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                                int64_t nested_blocksize, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& g, double scale) {
  refuse_trainable_base({packed, absmax, nested_absmax, nested_code, offset, bias}, "dora_nf4_linear",
                        "dora_forward");
  const variable_list out = DoraNf4LinearFunction::apply(x, packed, absmax, out_features, blocksize, bias,
                                                         nested_absmax, nested_code, offset, nested_blocksize, A,
                                                         B, g, scale);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("dora_linear", &dora_linear_autograd);
  m.impl("dora_nf4_linear", &dora_nf4_linear_autograd);
}

}  // namespace dora
}  // namespace lora_ext
