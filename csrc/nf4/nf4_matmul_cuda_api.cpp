// Torch-side glue of the NF4 linear on CUDA: the fused GEMV for small M, else dequantize into a
// fresh buffer (the caching allocator hands the same memory back on the next call: no growth, no
// copy kept) and cuBLAS.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/no_autocast.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_cuda_kernels.h"
#include "nf4/nf4_matmul_launch.h"

namespace lora_ext {
namespace nf4 {
namespace {

constexpr int64_t kCudaGemvMaxM = 16;  // not yet measured on a GPU: the bench sweeps M to find it
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

at::Tensor dequantized(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, const DequantArgs& w,
                       int64_t N, int64_t K, at::ScalarType dtype, const c10::optional<at::Tensor>& nested_absmax,
                       const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                       int64_t nested_blocksize) {
  at::Tensor out = at::empty({N, K}, packed.options().dtype(dtype));
  dequantize_into_cuda(packed, absmax, blocksize, w, nested_absmax, nested_code, offset, nested_blocksize, out);
  return out;
}

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t out_features, int64_t blocksize, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& nested_absmax,
                           const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                           int64_t nested_blocksize, int64_t gemv_max_m) {
  const auto a = check_linear_args("nf4_linear", x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                   nested_code, offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  auto out_shape = x.sizes().vec();
  out_shape.back() = a.N;
  at::Tensor x2d = x.reshape({a.M, a.K});
  if (a.M == 0 || a.N == 0 || a.K == 0) {
    at::Tensor y = at::zeros({a.M, a.N}, x.options());
    if (bias.has_value()) y.add_(*bias);
    return y.view(out_shape);
  }
  const int64_t max_m = gemv_max_m < 0 ? kCudaGemvMaxM : gemv_max_m;
  const bool is_double = x.scalar_type() == at::kDouble;  // gradcheck: BLAS on the exact fp32 weight
  if (!is_double && a.M <= max_m && (a.M + 3) / 4 <= kMaxGridY && (a.N + 3) / 4 <= kMaxGridX) {
    if (x2d.stride(1) != 1) x2d = x2d.contiguous();
    at::Tensor y = at::empty({a.M, a.N}, x.options());
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    GemvParams p{};
    p.x = x2d.const_data_ptr();
    p.packed = packed.const_data_ptr<uint8_t>();
    p.bias = bias.has_value() ? b.const_data_ptr() : nullptr;
    p.y = y.data_ptr();
    p.M = a.M;
    p.N = a.N;
    p.K = a.K;
    p.ldx = a.M == 1 ? a.K : x2d.stride(0);  // one row: its stride is arbitrary, keep the vector path
    p.blocksize_log2 = log2_exact(blocksize);
    p.dtype = to_dtype(x.scalar_type());
    p.scales = scale_source(absmax, nested_absmax, nested_code, offset, nested_blocksize);
    launch_nf4_gemv(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y.view(out_shape);
  }
  // As bitsandbytes and PEFT do at large M: W in the activation dtype, cuBLAS with fp32 accumulation.
  const at::Tensor w = dequantized(packed, absmax, blocksize, a.weight, a.N, a.K, weight_dtype(x.scalar_type()),
                                   nested_absmax, nested_code, offset, nested_blocksize)
                           .to(x.scalar_type());
  const at::Tensor y = bias.has_value() ? at::addmm(*bias, x2d, w.t()) : at::mm(x2d, w.t());
  return y.view(out_shape);
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t in_features, int64_t blocksize,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_code,
                                      const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const auto a = check_grad_input_args(grad_out, packed, absmax, in_features, blocksize, nested_absmax, nested_code,
                                       offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const NoAutocast no_autocast;
  auto out_shape = grad_out.sizes().vec();
  out_shape.back() = a.K;
  if (a.M == 0 || a.N == 0 || a.K == 0) return at::zeros(out_shape, grad_out.options());
  const at::Tensor W = dequantized(packed, absmax, blocksize, a.weight, a.N, a.K, weight_dtype(grad_out.scalar_type()),
                                   nested_absmax, nested_code, offset, nested_blocksize)
                           .to(grad_out.scalar_type());
  return at::mm(grad_out.reshape({a.M, a.N}), W).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace nf4
}  // namespace lora_ext
