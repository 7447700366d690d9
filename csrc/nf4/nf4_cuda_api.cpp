// Torch-side glue of the NF4 CUDA kernels: argument checks (shared with the CPU glue), device
// guard, allocation, current stream, launch check.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "nf4/nf4_checks.h"
#include "nf4/nf4_cuda_kernels.h"

namespace lora_ext {
namespace nf4 {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", t);
  }
  return DType::kFloat32;
}

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& A_in, int64_t blocksize) {
  check_quantize_args(A_in, blocksize);
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous();
  const int64_t n = A.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  QuantizeParams p{A.const_data_ptr(), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n,
                   log2_exact(blocksize), to_dtype(A.scalar_type())};
  if (n > 0) {
    launch_quantize_nf4(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quant_cuda(const at::Tensor& absmax_in, const at::Tensor& code,
                                                                 int64_t blocksize) {
  check_double_quant_args(absmax_in, code, blocksize);
  const c10::cuda::CUDAGuard guard(absmax_in.device());
  const at::Tensor absmax = absmax_in.contiguous().view(-1);
  const int64_t n = absmax.numel();
  // torch's own mean, as bitsandbytes takes it; it stays on the device (no sync).
  at::Tensor offset = n > 0 ? absmax.mean() : at::zeros({}, absmax.options());
  at::Tensor q = at::empty({n}, absmax.options().dtype(at::kByte));
  at::Tensor nested = at::empty({ceil_div(n, blocksize)}, absmax.options());
  DoubleQuantParams p{absmax.const_data_ptr<float>(), offset.const_data_ptr<float>(), code.const_data_ptr<float>(),
                      q.data_ptr<uint8_t>(), nested.data_ptr<float>(), n, log2_exact(blocksize)};
  if (n > 0) {
    launch_double_quant(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {q, nested, offset};
}

}  // namespace

void dequantize_into_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                          const DequantArgs& args, const c10::optional<at::Tensor>& nested_absmax,
                          const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                          int64_t nested_blocksize, at::Tensor& out) {
  DequantizeParams p{};
  p.packed = packed.const_data_ptr<uint8_t>();
  p.out = out.data_ptr();
  p.n = args.n;
  p.blocksize_log2 = log2_exact(blocksize);
  p.dtype = to_dtype(out.scalar_type());
  p.scales = scale_source(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  if (args.n > 0) {
    launch_dequantize_nf4(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

namespace {

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::IntArrayRef shape, at::ScalarType dtype,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                               int64_t nested_blocksize) {
  const auto args = check_dequantize_args(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                                          nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_into_cuda(packed, absmax, blocksize, args, nested_absmax, nested_code, offset, nested_blocksize, out);
  return out;
}

void dequantize_nf4_out_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, at::Tensor& out,
                             const c10::optional<at::Tensor>& nested_absmax,
                             const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                             int64_t nested_blocksize) {
  check_dequantize_out(out, packed);
  const auto args = check_dequantize_args(packed, absmax, blocksize, out.sizes(), out.scalar_type(), nested_absmax,
                                          nested_code, offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  dequantize_into_cuda(packed, absmax, blocksize, args, nested_absmax, nested_code, offset, nested_blocksize, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4_cuda);
  m.impl("double_quant", &double_quant_cuda);
  m.impl("dequantize_nf4", &dequantize_nf4_cuda);
  m.impl("dequantize_nf4_out", &dequantize_nf4_out_cuda);
}

}  // namespace nf4
}  // namespace lora_ext
