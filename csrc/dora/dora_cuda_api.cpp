// Torch-side glue of the DoRA operators on CUDA: the LoRA branch's products (lora_cuda_glue.h) with g and
// the bias in y's epilogue and g * B as the backward's B, and the column-dot kernel for dg. fp64 goes
// through the cuBLAS composite (dora_composite.h), which has the same semantics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dora/dora_composite.h"
#include "dora/dora_launch.h"
#include "lora/lora_cuda_glue.h"
#include "lora/lora_dtype.h"

namespace lora_ext {
namespace dora {
namespace {

// The fp32 sums over rows of a * b (M x N; two dtypes that differ go through fp32).
at::Tensor column_dots_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto operands = column_dot_operands(a_in, b_in);
  const at::Tensor &a = operands.first, &b = operands.second;
  const int64_t M = a.size(0), N = a.size(1);
  const int splits =
      column_dot_splits(M, N, 2LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor partial = at::empty({splits, N}, a.options().dtype(at::kFloat));
  const ColumnDotParams p{a.const_data_ptr(), b.const_data_ptr(), lora::to_dtype(a.scalar_type()),
                          partial.data_ptr<float>(), M, N, splits};
  TORCH_INTERNAL_ASSERT(launch_column_dots(p, at::cuda::getCurrentCUDAStream()), "dora: no kernel for ",
                        a.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits == 1 ? partial[0] : partial.sum(0);  // (ATen's sum over dim 0: deterministic on a given GPU)
}

std::tuple<at::Tensor, at::Tensor> dora_forward_cuda(const at::Tensor& x, const at::Tensor& base_out,
                                                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& g,
                                                     const c10::optional<at::Tensor>& bias, double scale) {
  const LoraDims d = check_forward_args(x, base_out, A, B, g, bias);  // first: a CPU x must get its message
  const c10::cuda::CUDAGuard guard(x.device());
  if (!is_float_type(x.scalar_type()) || !is_float_type(base_out.scalar_type()) || !is_float_type(A.scalar_type())) {
    return forward_impl(x, base_out, A, B, g, bias, scale);
  }
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto [y, T] = lora::lowrank_forward_cuda(d, x, base_out, A.to(at::kFloat).contiguous(),
                                                 B.to(at::kFloat).contiguous(), scale, 0.0, 0,
                                                 g.to(at::kFloat).contiguous(), bias32);
  return {y, T.to(A.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& T,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& g, double scale,
    const c10::optional<at::Tensor>& grad_x_base) {
  const LoraDims d = check_backward_args(grad_y, x, base_out, T, A, B, g, grad_x_base);
  const c10::cuda::CUDAGuard guard(x.device());
  if (!is_float_type(grad_y.scalar_type()) || !is_float_type(x.scalar_type()) || !is_float_type(A.scalar_type()) ||
      !is_float_type(base_out.scalar_type()) || !lora::addend_cast_exact(grad_x_base, x.scalar_type())) {
    return backward_impl(grad_y, x, base_out, T, A, B, g, scale, grad_x_base, column_dots_cuda);
  }
  const at::Tensor g32 = g.to(at::kFloat).unsqueeze(1), B32 = B.to(at::kFloat);
  const auto [dx, dA, dB] = lora::lowrank_backward_cuda(d, grad_y, x, T, A, (B32 * g32).contiguous(), scale, 0.0,
                                                        0, grad_x_base);  // dB = s dy^T T = the true dB / g
  const at::Tensor dg = column_dots_cuda(grad_y.reshape({d.M, d.N}), base_out.reshape({d.M, d.N})) + (dB * B32).sum(1);
  return {dx, dA, (dB * g32).to(B.scalar_type()), dg.to(g.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("dora_forward", &dora_forward_cuda);
  m.impl("dora_backward", &dora_backward_cuda);
}

}  // namespace dora
}  // namespace lora_ext
