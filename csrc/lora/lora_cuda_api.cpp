// Torch-side glue of the LoRA operators on CUDA: the Philox dropout kernel plus cuBLAS for the
// low-rank products (lora_composite.h), on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "lora/lora_composite.h"
#include "lora/lora_launch.h"

namespace lora_ext {
namespace lora {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "lora_ext: lora_dropout: input must be floating point, got ", t);
  }
  return DType::kFloat32;
}

at::Tensor dropout_cuda_impl(const at::Tensor& x, const DropoutSpec& spec) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() > 0) {
    launch_dropout({x.const_data_ptr(), out.data_ptr(), x.numel(), spec, to_dtype(x.scalar_type())},
                   at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor lora_dropout_cuda(const at::Tensor& x, double p, int64_t seed) {
  LORA_CHECK(p >= 0.0 && p < 1.0, "lora_dropout: p must be in [0, 1), got ", p);
  return dropout_cuda_impl(x.contiguous(), dropout_spec(p, static_cast<uint64_t>(seed))).view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x, const at::Tensor& base_out,
                                                     const at::Tensor& A, const at::Tensor& B, double scale,
                                                     double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_impl(x, base_out, A, B, scale, dropout_p, seed, dropout_cuda_impl);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& T, const at::Tensor& A,
                                                                  const at::Tensor& B, double scale, double dropout_p,
                                                                  int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_impl(grad_y, x, T, A, B, scale, dropout_p, seed, dropout_cuda_impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_dropout", &lora_dropout_cuda);
  m.impl("lora_forward", &lora_forward_cuda);
  m.impl("lora_backward", &lora_backward_cuda);
}

}  // namespace lora
}  // namespace lora_ext
