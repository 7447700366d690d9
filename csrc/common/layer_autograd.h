// Shared by the C++ autograd of the one-operator layers (csrc/lora/lora_layer_autograd.cpp,
// csrc/dora/dora_layer_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <vector>

#include "common/checks.h"
#include "nf4/nf4_linear_call.h"

namespace lora_ext {

// The base is computed inside the op, so it must be frozen (PEFT's base layers are). Checked before the
// Function's forward, which runs with grad mode off.
inline void refuse_trainable_base(const std::vector<c10::optional<at::Tensor>>& frozen, const char* op,
                                  const char* branch_op) {
  if (!at::GradMode::is_enabled()) return;
  for (const c10::optional<at::Tensor>& t : frozen) {
    LORA_CHECK(!(t.has_value() && t->defined() && t->requires_grad()), op,
               ": the base weight and bias are frozen here (they get no gradient); set requires_grad=False on "
               "them, or add ", branch_op, " to the base layer's own output");
  }
}

// The layer op itself, called from its Function's forward: below the Autograd key, so that it dispatches to the
// device's composite instead of back to this node.
template <typename Op, typename... Args>
auto call_below_autograd(const Op& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(args...);
}

// How many of these optional tensor arguments are present: autograd gives an edge only to those, so the
// edge index of a later argument counts them.
inline int64_t present(const std::vector<c10::optional<at::Tensor>>& ts) {
  int64_t n = 0;
  for (const c10::optional<at::Tensor>& t : ts) n += t.has_value() && t->defined();
  return n;
}

inline at::Tensor or_undefined(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
inline c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::optional<at::Tensor>();
}

// An NF4 base as the layers' autograd keeps it: the tensors to save (packed, absmax, nested_absmax,
// nested_code, offset; absent ones undefined), with the block sizes put in ctx->saved_data.
inline std::vector<at::Tensor> nf4_state_to_save(torch::autograd::AutogradContext* ctx, const at::Tensor& packed,
                                                 const at::Tensor& absmax, int64_t blocksize,
                                                 const c10::optional<at::Tensor>& nested_absmax,
                                                 const c10::optional<at::Tensor>& nested_code,
                                                 const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  ctx->saved_data["blocksize"] = blocksize;
  ctx->saved_data["nested_blocksize"] = nested_blocksize;
  return {packed, absmax, or_undefined(nested_absmax), or_undefined(nested_code), or_undefined(offset)};
}

// The base's dx (grad W) from that state, saved from index `first` on.
inline at::Tensor nf4_grad_input(torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& saved,
                                 size_t first, const at::Tensor& grad, int64_t in_features) {
  return nf4::call_nf4_linear_grad_input(grad, saved[first], saved[first + 1], in_features,
                                         ctx->saved_data["blocksize"].toInt(), opt(saved[first + 2]),
                                         opt(saved[first + 3]), opt(saved[first + 4]),
                                         ctx->saved_data["nested_blocksize"].toInt());
}

}  // namespace lora_ext
