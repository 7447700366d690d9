// The autograd of the one-operator LoRA layers (lora_linear, lora_nf4_linear), in C++: one node whose
// backward takes the base's dx (dy W, or the NF4 weight's dequantize-matmul) and hands it to lora_backward
// as grad_x_base, so the layer's dx is written once. In C++ rather than torch.library.register_autograd
// because the Python wrapper costs more than the layer's own work at small sizes: 183 against 92 µs a
// forward + backward of a 16 x 16 layer (2 cores of an AMD EPYC), paid by every adapted projection at
// every step. torch.compile traces through it like through an ATen op's autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/layer_autograd.h"

namespace lora_ext {
namespace lora {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_lora_backward(const at::Tensor& grad_y, const variable_list& saved,
                                                                  AutogradContext* ctx, const OptTensor& grad_x_base) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, double, double, int64_t, const OptTensor&)>();
  return op.call(grad_y, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["scale"].toDouble(),
                 ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toInt(), grad_x_base);
}

// Saved: x, T, A, B, then what the base's dx reads; the scalars; and the edge index of A (B's is the next):
// autograd gives an edge only to the tensor arguments that are present.
void save_branch(AutogradContext* ctx, const at::Tensor& x, const Pair& out, const at::Tensor& A,
                 const at::Tensor& B, const std::vector<at::Tensor>& base, double scale, double dropout_p,
                 int64_t seed, int64_t a_edge) {
  std::vector<at::Tensor> saved = {x, std::get<1>(out), A, B};
  saved.insert(saved.end(), base.begin(), base.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["a_edge"] = a_edge;
  ctx->mark_non_differentiable({std::get<1>(out)});
  // Only y has a gradient: T's stays undefined instead of zeros allocated and filled at every backward.
  ctx->set_materialize_grads(false);
}

// The layer's gradients, one per forward argument (n_args): x first, A and B fifth and fourth from last.
variable_list branch_grads(AutogradContext* ctx, const at::Tensor& grad_y, const variable_list& saved,
                           const OptTensor& grad_x_base, size_t n_args) {
  const auto grads = call_lora_backward(grad_y, saved, ctx, grad_x_base);
  variable_list out(n_args);
  const auto a_edge = static_cast<size_t>(ctx->saved_data["a_edge"].toInt());
  if (ctx->needs_input_grad(0)) out[0] = std::get<0>(grads);
  if (ctx->needs_input_grad(a_edge)) out[n_args - 5] = std::get<1>(grads);
  if (ctx->needs_input_grad(a_edge + 1)) out[n_args - 4] = std::get<2>(grads);
  return out;
}

}  // namespace

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& A, const at::Tensor& B, double scale,
                               double dropout_p, int64_t seed) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lora_ext::lora_linear", "")
                               .typed<Pair(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                           const at::Tensor&, double, double, int64_t)>();
    const Pair out = call_below_autograd(op, x, weight, bias, A, B, scale, dropout_p, seed);
    save_branch(ctx, x, out, A, B, {weight}, scale, dropout_p, seed, 2 + present({bias}));
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return variable_list(8);
    OptTensor grad_x_base;
    // In grad_y's dtype: under autocast the forward's base product ran in it too.
    if (ctx->needs_input_grad(0)) grad_x_base = at::matmul(grad_y, saved[4].to(grad_y.scalar_type()));
    return branch_grads(ctx, grad_y, saved, grad_x_base, 8);
  }
};

struct LoraNf4LinearFunction : public torch::autograd::Function<LoraNf4LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, int64_t out_features, int64_t blocksize, const OptTensor& bias,
                               const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                               int64_t nested_blocksize, const at::Tensor& A, const at::Tensor& B, double scale,
                               double dropout_p, int64_t seed) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lora_ext::lora_nf4_linear", "")
            .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, const OptTensor&,
                        const OptTensor&, const OptTensor&, const OptTensor&, int64_t, const at::Tensor&,
                        const at::Tensor&, double, double, int64_t)>();
    const Pair out = call_below_autograd(op, x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                                nested_code, offset, nested_blocksize, A, B, scale, dropout_p, seed);
    save_branch(ctx, x, out, A, B,
                nf4_state_to_save(ctx, packed, absmax, blocksize, nested_absmax, nested_code, offset, nested_blocksize),
                scale, dropout_p, seed, 3 + present({bias, nested_absmax, nested_code, offset}));
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return variable_list(15);
    OptTensor grad_x_base;
    if (ctx->needs_input_grad(0)) grad_x_base = nf4_grad_input(ctx, saved, 4, grad_y, saved[0].size(-1));
    return branch_grads(ctx, grad_y, saved, grad_x_base, 15);
  }
};

namespace {

Pair lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                          const at::Tensor& B, double scale, double dropout_p, int64_t seed) {
  refuse_trainable_base({weight, bias}, "lora_linear", "lora_forward");
  const variable_list out = LoraLinearFunction::apply(x, weight, bias, A, B, scale, dropout_p, seed);
  return {out[0], out[1]};
}

Pair lora_nf4_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t out_features, int64_t blocksize, const OptTensor& bias,
                              const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                              int64_t nested_blocksize, const at::Tensor& A, const at::Tensor& B, double scale,
                              double dropout_p, int64_t seed) {
  refuse_trainable_base({packed, absmax, nested_absmax, nested_code, offset, bias}, "lora_nf4_linear",
                        "lora_forward");
  const variable_list out =
      LoraNf4LinearFunction::apply(x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code,
                                   offset, nested_blocksize, A, B, scale, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("lora_nf4_linear", &lora_nf4_linear_autograd);
}

}  // namespace lora
}  // namespace lora_ext
