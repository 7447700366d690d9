// DoRA's operators on the CPU: the composite of dora_composite.h, with the column dots of dg as a
// loop over column chunks (dora_common.h's per-element step, as the CUDA kernel), and the norm's A W^T
// reading the weight in its own dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_dot.h"
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

// A W^T for a weight stored row by row (nn.Linear's layout): each thread converts 8 rows of W at a time to
// fp32 in a buffer of its own (8 x K, in cache) and takes their dots with every row of A, so W is read
// once, in its own dtype, and nothing of its size is written. Other layouts and fp64: a_times_w_t_blocks.
// The dots: cpu_dot::dot8 (AVX2/FMA or portable). (An AVX-512 4 x 4 register-blocked variant measured
// 1.6 ms against dot8's 1.0 ms for a 3584 x 1024 bf16 W on this AMD CPU, whose AVX-512 is two 256-bit halves.)
constexpr int64_t kRowsAtOnce = 8;  // cpu_dot::dot8's

// out[j * ldo + l] = A_j . rows_l for the r rows of A and the n (<= 8) converted rows of W (zero past n).
void block_dots(const float* A, int64_t r, const float* rows, int64_t n, int64_t K, float* out, int64_t ldo) {
  float acc[kRowsAtOnce];
  for (int64_t j = 0; j < r; ++j) {
    cpu_dot::dot8(A + j * K, rows, K, acc);
    for (int64_t l = 0; l < n; ++l) out[j * ldo + l] = acc[l];
  }
}

at::Tensor dora_a_times_w_t_cpu(const at::Tensor& A, const at::Tensor& weight) {
  check_a_times_w_t_args(A, weight);
  if (A.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble || weight.stride(1) != 1) {
    return a_times_w_t_blocks(A, weight);
  }
  const at::Tensor A32 = A.to(at::kFloat).contiguous();
  const int64_t r = A.size(0), N = weight.size(0), K = weight.size(1), ldw = weight.stride(0);
  at::Tensor out = at::empty({r, N}, A.options().dtype(at::kFloat));
  const float* a = A32.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  LORA_DISPATCH_FLOAT_TYPES(weight.scalar_type(), "dora_a_times_w_t_cpu", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kRowsAtOnce * K));
    at::parallel_for(0, ceil_div(N, kRowsAtOnce), grain, [&](int64_t b0, int64_t b1) {
      std::vector<float> rows(static_cast<size_t>(kRowsAtOnce * K), 0.0f);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kRowsAtOnce, n = std::min(kRowsAtOnce, N - n0);
        for (int64_t l = 0; l < n; ++l) {
          const scalar_t* src = w + (n0 + l) * ldw;
          for (int64_t k = 0; k < K; ++k) rows[l * K + k] = static_cast<float>(src[k]);
        }
        for (int64_t l = n; l < kRowsAtOnce; ++l) std::fill_n(rows.data() + l * K, K, 0.0f);
        block_dots(a, r, rows.data(), n, K, o + n0, N);
      }
    });
  });
  return out;
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
