// The LoRA branch's skinny products on the CPU, with the CUDA kernels' epilogue (lora_gemm.cuh's finish):
// out = alpha * (P Q) [+ addend] [* col_scale + col_bias], every step an fp32 rounding, out rounded once to its
// dtype. One of the two operands is narrow (the rank r): T = x A^T, y = base + s T B^T (DoRA: times g, plus
// bias), dT = s dy B, dB^T = s T^T dy, dA = dT^T x, dx = dx_base + dT A. The wide operand Q is read in its own
// dtype and strides (x and dy in bf16, A^T as a view), and so is P; the addend is read, and out written, in 16
// bits: no fp32 copies and no conversion pass back, where BLAS needs both.
#pragma once

#include <ATen/ATen.h>

namespace lora_ext {
namespace lora {

// P: M x K, any strides (a 16-bit P whose rows are not contiguous is copied first); Q: K x N, any strides;
// out: M x N contiguous (each fp32, bf16 or fp16); addend: undefined, or out's dtype and shape, contiguous (it
// may be out itself); col_scale and col_bias: N fp32 values, or null. All on the CPU.
void lowrank_gemm_cpu(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& addend, at::Tensor& out,
                      float alpha, const float* col_scale = nullptr, const float* col_bias = nullptr);

// Whether lowrank_gemm_cpu serves an op whose products are in `compute_dtype` and whose output is like
// `out_like`: on the CPU, in fp32.
inline bool lowrank_gemm_cpu_applies(const at::Tensor& out_like, at::ScalarType compute_dtype) {
  return out_like.device().is_cpu() && compute_dtype == at::kFloat;
}

}  // namespace lora
}  // namespace lora_ext
