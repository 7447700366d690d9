// The LoRA branch's products (lora_plan.h) launched on the current stream, for fp32/fp16/bf16
// activations: the CUDA glue of the LoRA operators and of DoRA's (dora_cuda_api.cpp). The caller has
// checked the arguments and holds a CUDAGuard on x's device.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lora/lora_checks.h"

namespace lora_ext {
namespace lora {

// The dx epilogue reads grad_x_base in x's dtype, so it may take it only when that cast is exact (the
// same dtype, or 16-bit into fp32); otherwise the composite adds it before dx's one rounding.
bool addend_cast_exact(const c10::optional<at::Tensor>& grad_x_base, at::ScalarType x_dtype);

// (y, T): y = base_out + s T B^T in base_out's dtype and shape, T = dropout(x) A^T in fp32 (M x r).
// With g32 and bias32 (fp32, N long; either may be undefined), DoRA's y = g * (base_out + s T B^T) + bias,
// in the same one rounding. A32 and B32: contiguous fp32 adapters.
std::tuple<at::Tensor, at::Tensor> lowrank_forward_cuda(const LoraDims& d, const at::Tensor& x,
                                                        const at::Tensor& base_out, const at::Tensor& A32,
                                                        const at::Tensor& B32, double scale, double dropout_p,
                                                        int64_t seed, const at::Tensor& g32 = at::Tensor(),
                                                        const at::Tensor& bias32 = at::Tensor());

// (dx, dA, dB): dx in x's dtype and shape (+ grad_x_base, which must pass addend_cast_exact), dA in A's
// dtype, dB = s dy^T T in fp32 (N x r). B32 is the contiguous fp32 B the products read (DoRA: g * B).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_backward_cuda(const LoraDims& d, const at::Tensor& grad_y,
                                                                     const at::Tensor& x, const at::Tensor& T,
                                                                     const at::Tensor& A, const at::Tensor& B32,
                                                                     double scale, double dropout_p, int64_t seed,
                                                                     const c10::optional<at::Tensor>& grad_x_base);

}  // namespace lora
}  // namespace lora_ext
