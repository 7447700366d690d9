// nf4_linear and its input gradient through the dispatcher (the device's kernels), for the layer operators
// built on them (lora_nf4_linear, dora_nf4_linear) and their autograd.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace lora_ext {
namespace nf4 {

inline at::Tensor call_nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t out_features, int64_t blocksize, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& nested_absmax,
                                  const c10::optional<at::Tensor>& nested_code,
                                  const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  using OptTensor = c10::optional<at::Tensor>;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_ext::nf4_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                            const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t)>();
  return op.call(x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code, offset,
                 nested_blocksize, -1);  // -1: the op picks the path by M
}

// nf4_linear_grad_input through the dispatcher: the NF4 base's dx (dy W), for the layers' autograd.
inline at::Tensor call_nf4_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& packed,
                                             const at::Tensor& absmax, int64_t in_features, int64_t blocksize,
                                             const c10::optional<at::Tensor>& nested_absmax,
                                             const c10::optional<at::Tensor>& nested_code,
                                             const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  using OptTensor = c10::optional<at::Tensor>;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_ext::nf4_linear_grad_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                            const OptTensor&, const OptTensor&, const OptTensor&, int64_t)>();
  return op.call(grad_out, packed, absmax, in_features, blocksize, nested_absmax, nested_code, offset,
                 nested_blocksize);
}

}  // namespace nf4
}  // namespace lora_ext
