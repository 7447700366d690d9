// Shared by the C++ autograd of the one-operator layers (csrc/lora/lora_layer_autograd.cpp,
// csrc/dora/dora_layer_autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"

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

}  // namespace lora_ext
