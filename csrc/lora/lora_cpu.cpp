// LoRA operators on the CPU: the Philox dropout kernel (same bits as CUDA) and the composite
// forward/backward of lora_composite.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "common/dispatch.h"
#include "lora/lora_composite.h"

namespace lora_ext {
namespace lora {
namespace {

at::Tensor dropout_cpu_impl(const at::Tensor& x, const DropoutSpec& spec) {
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Philox4 r = philox4x32_10(static_cast<uint64_t>(c), spec.seed);
        for (int j = 0; j < 4 && 4 * c + j < n; ++j) {
          const int64_t e = 4 * c + j;
          // double stays double (gradcheck); the rest round once from fp32, as on CUDA
          if constexpr (std::is_same_v<scalar_t, double>) {
            o[e] = r.v[j] < spec.keep_threshold ? in[e] * static_cast<double>(spec.inv_keep) : 0.0;
          } else {
            o[e] = static_cast<scalar_t>(dropout_with_draw(static_cast<float>(in[e]), r.v[j], spec));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  LORA_CHECK(p >= 0.0 && p < 1.0, "lora_dropout: p must be in [0, 1), got ", p);
  LORA_CHECK(at::isFloatingType(x.scalar_type()), "lora_dropout: input must be floating point, got ", x.scalar_type());
  return dropout_cpu_impl(x.contiguous(), dropout_spec(p, static_cast<uint64_t>(seed))).view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x, const at::Tensor& base_out,
                                                    const at::Tensor& A, const at::Tensor& B, double scale,
                                                    double dropout_p, int64_t seed) {
  return forward_impl(x, base_out, A, B, scale, dropout_p, seed, dropout_cpu_impl);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                 const at::Tensor& T, const at::Tensor& A,
                                                                 const at::Tensor& B, double scale, double dropout_p,
                                                                 int64_t seed,
                                                                 const c10::optional<at::Tensor>& grad_x_base) {
  return backward_impl(grad_y, x, T, A, B, scale, dropout_p, seed, grad_x_base, dropout_cpu_impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_dropout", &lora_dropout_cpu);
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_backward", &lora_backward_cpu);
}

}  // namespace lora
}  // namespace lora_ext
