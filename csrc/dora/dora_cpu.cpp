// DoRA's operators on the CPU: the composite of dora_composite.h, with the column dots of dg as a
// loop over column chunks (dora_common.h's per-element step, as the CUDA kernel), and the norm's A W^T
// through the LoRA products' kernel, reading the weight in its own dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/dispatch.h"
#include "dora/dora_common.h"
#include "dora/dora_composite.h"

namespace lora_ext {
namespace dora {
namespace {

constexpr int64_t kChunk = 64;  // columns per task: their running sums stay in registers / L1

// The fp32 sums over rows of a * b (M x N; two 16-bit dtypes that differ go through fp32).
at::Tensor column_dots_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto operands = column_dot_operands(a_in, b_in);  // (C++17: a structured binding is not captured)
  const at::Tensor &a = operands.first, &b = operands.second;
  const int64_t M = a.size(0), N = a.size(1);
  at::Tensor out = at::empty({N}, a.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  LORA_DISPATCH_FLOAT_TYPES(a.scalar_type(), "dora_column_dots_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, ceil_div(N, kChunk), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kChunk, n = std::min(kChunk, N - j0);
        float acc[kChunk] = {};
        for (int64_t i = 0; i < M; ++i) {
          const scalar_t* ra = pa + i * N + j0;
          const scalar_t* rb = pb + i * N + j0;
          for (int64_t j = 0; j < n; ++j)
            acc[j] = dot_step(acc[j], static_cast<float>(ra[j]), static_cast<float>(rb[j]));
        }
        std::copy(acc, acc + n, o + j0);
      }
    });
  });
  return out;
}

// A W^T for a weight stored row by row (nn.Linear's layout), as (W A^T)^T: the LoRA products' kernel
// (lora_gemm_cpu.h) with W as its row operand, read in its own dtype 8 values of a row at a time, so nothing
// of W's size is written. W A^T (N x r) is transposed, a copy of r x N. Other layouts and fp64:
// a_times_w_t_blocks. (For a 3584 x 1024 bf16 W and r = 16, on 2 cores of an AMD EPYC: 0.88 ms, where 8-row
// AVX2 dots took 1.0 ms and an AVX-512 4 x 4 register-blocked variant 1.6 ms.)
at::Tensor dora_a_times_w_t_cpu(const at::Tensor& A, const at::Tensor& weight) {
  check_a_times_w_t_args(A, weight);
  if (A.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble || !weight.is_contiguous()) {
    return a_times_w_t_blocks(A, weight);
  }
  at::Tensor w_at = at::empty({weight.size(0), A.size(0)}, A.options().dtype(at::kFloat));
  lora::lowrank_gemm_cpu(weight, A.t(), {}, w_at, 1.0f);
  return w_at.t().contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& T,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& g, double scale,
    const c10::optional<at::Tensor>& grad_x_base) {
  return backward_impl(grad_y, x, base_out, T, A, B, g, scale, grad_x_base, column_dots_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dora_forward", &forward_impl);
  m.impl("dora_backward", &dora_backward_cpu);
  m.impl("dora_a_times_w_t", &dora_a_times_w_t_cpu);
}

}  // namespace dora
}  // namespace lora_ext
