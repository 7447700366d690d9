// DoRA's layer operators on the CPU: the composite of dora_composite.h, with the column dots of dg as a
// loop over column chunks (dora_common.h's per-element step, as the CUDA kernel), and g * dy in one pass.
// The weight norm's kernels are in dora_norm_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_simd16.h"
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

// One row of g * dy: the fp32 product, rounded once to T (c10's rounding, as .to(T) of the fp32 product).
template <typename T>
void scale_row_portable(const T* dy, const float* g, T* out, int64_t from, int64_t n) {
  for (int64_t j = from; j < n; ++j) out[j] = static_cast<T>(static_cast<float>(dy[j]) * g[j]);
}

#if defined(LORA_EXT_X86_SIMD)
template <typename T>
__attribute__((target("avx2,f16c"))) int64_t scale_row_avx2(const T* dy, const float* g, T* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) simd16::store8(out + j, _mm256_mul_ps(simd16::load8(dy + j), _mm256_loadu_ps(g + j)));
  return j;
}
#endif

// g * dy in dy's dtype, one pass: the composite's at::mul_out takes a slow unvectorized path on the CPU for
// a 16-bit dy times an fp32 g (1.1 ms for 128 x 3584 with torch 2.14), and the copy to fp32, mul_ and copy
// back took ~0.3 ms inside a training step. Other dtypes (fp64) go through the composite.
at::Tensor dora_scaled_grad_cpu(const at::Tensor& grad_y, const at::Tensor& g) {
  check_scaled_grad_args(grad_y, g);
  if (!is_float_type(grad_y.scalar_type()) || g.scalar_type() != at::kFloat) return scaled_grad_impl(grad_y, g);
  const at::Tensor dy = grad_y.contiguous(), g32 = g.contiguous();
  at::Tensor out = at::empty(dy.sizes(), dy.options());
  const int64_t N = dy.size(-1), M = N == 0 ? 0 : dy.numel() / N;
  const bool simd = x86_simd_enabled();
  LORA_DISPATCH_FLOAT_TYPES(dy.scalar_type(), "dora_scaled_grad_cpu", [&] {
    const scalar_t* in = dy.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const float* gp = g32.const_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, N));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int64_t j = 0;
#if defined(LORA_EXT_X86_SIMD)
        if (simd) j = scale_row_avx2(in + m * N, gp, o + m * N, N);
#endif
        scale_row_portable(in + m * N, gp, o + m * N, j, N);
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
  m.impl("dora_scaled_grad", &dora_scaled_grad_cpu);
}

}  // namespace dora
}  // namespace lora_ext
