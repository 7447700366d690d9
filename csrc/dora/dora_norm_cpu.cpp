// DoRA's weight norm on the CPU: A W^T (dora_a_times_w_t) through the LoRA products' kernel, and the norms
// ||W_i + s B_i A|| (dora_weight_norm, dora_weight_norm_from_a_w_t) from it in one in-place addmm and one
// pass over the rows. The composite's ATen calls (a transposed copy of A W^T, addmm, a product, a sum and
// three passes over the N norms) took ~0.12 ms a layer inside a CPU training step of the Llama block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/no_autocast.h"
#include "dora/dora_composite.h"
#include "lora/lora_gemm_cpu.h"

namespace lora_ext {
namespace dora {
namespace {

// Whether the LoRA products' kernel (lora_gemm_cpu.h) reads this weight as it is: stored row by row (nn.Linear's
// layout), in fp32 or 16 bits, with A not fp64. Other layouts and fp64 go through a_times_w_t_blocks.
bool products_kernel_reads(const at::Tensor& A, const at::Tensor& weight) {
  return A.scalar_type() != at::kDouble && weight.scalar_type() != at::kDouble && weight.is_contiguous();
}

// W A^T (N x r, fp32, contiguous): with products_kernel_reads, that kernel with W as its row operand, read in its
// own dtype 8 values of a row at a time, so nothing of W's size is written. (For a 3584 x 1024 bf16 W and r = 16,
// on 2 cores of an AMD EPYC: 0.74-0.79 ms, where 8-row AVX2 dots took 1.0 ms and an AVX-512 4 x 4
// register-blocked variant 1.6 ms.)
at::Tensor w_a_t_cpu(const at::Tensor& A, const at::Tensor& weight) {
  if (!products_kernel_reads(A, weight)) return a_times_w_t_blocks(A, weight).to(at::kFloat).t().contiguous();
  at::Tensor w_at = at::empty({weight.size(0), A.size(0)}, A.options().dtype(at::kFloat));
  lora::lowrank_gemm_cpu(weight, A.t(), {}, w_at, 1.0f);
  return w_at;
}

at::Tensor dora_a_times_w_t_cpu(const at::Tensor& A, const at::Tensor& weight) {
  check_a_times_w_t_args(A, weight);
  if (!products_kernel_reads(A, weight)) return a_times_w_t_blocks(A, weight);  // fp64 stays fp64
  return w_a_t_cpu(A, weight).t().contiguous();
}

// sqrt(max(0, w_sq_i + sum_q B_iq both_iq)) for both = 2s (W A^T) + s^2 B (A A^T), computed in place in w_at
// (N x r, fp32, contiguous); A32 is A in fp32.
at::Tensor norms_from_w_at(at::Tensor w_at, const at::Tensor& A32, const at::Tensor& B, const at::Tensor& w_sq,
                           double scale) {
  const at::Tensor B32 = B.to(at::kFloat).contiguous();
  const at::Tensor w_sq32 = w_sq.to(at::kFloat).contiguous();
  w_at.addmm_(B32, at::mm(A32, A32.t()), 2.0 * scale, scale * scale);
  const int64_t N = w_at.size(0), r = w_at.size(1);
  at::Tensor out = at::empty({N}, w_at.options());
  const float* both = w_at.const_data_ptr<float>();
  const float* b = B32.const_data_ptr<float>();
  const float* w = w_sq32.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, r)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float acc = 0.0f;
      for (int64_t q = 0; q < r; ++q) acc += b[i * r + q] * both[i * r + q];
      const float sq = w[i] + acc;
      o[i] = std::sqrt(sq < 0.0f ? 0.0f : sq);  // a NaN stays NaN, as clamp_min keeps it (std::max would not)
    }
  });
  return out;
}

at::Tensor dora_weight_norm_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& weight,
                                const at::Tensor& w_sq, double scale) {
  const NoAutocast no_autocast;
  check_weight_norm_args("dora_weight_norm", A, B, weight, true, w_sq);
  const at::Tensor A32 = A.to(at::kFloat);
  return norms_from_w_at(w_a_t_cpu(A32, weight), A32, B, w_sq, scale);
}

at::Tensor dora_weight_norm_from_a_w_t_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& a_w_t,
                                           const at::Tensor& w_sq, double scale) {
  const NoAutocast no_autocast;
  check_weight_norm_args("dora_weight_norm_from_a_w_t", A, B, a_w_t, false, w_sq);
  // a copy, which norms_from_w_at overwrites (a_w_t.t() may already be contiguous)
  return norms_from_w_at(a_w_t.t().to(at::kFloat, false, /*copy=*/true, at::MemoryFormat::Contiguous),
                         A.to(at::kFloat), B, w_sq, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dora_a_times_w_t", &dora_a_times_w_t_cpu);
  m.impl("dora_weight_norm", &dora_weight_norm_cpu);
  m.impl("dora_weight_norm_from_a_w_t", &dora_weight_norm_from_a_w_t_cpu);
}

}  // namespace dora
}  // namespace lora_ext
