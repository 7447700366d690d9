// Torch-side glue of the CUDA merge: checks (before W is touched), fp64 copies of the small
// adapters, device guard, current stream, launch check.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "merge/merge_checks.h"
#include "merge/merge_launch.h"
#include "nf4/nf4_cuda_kernels.h"

namespace lora_ext {
namespace merge {
namespace {

constexpr int64_t kMaxGridY = 65535;

void merge_impl(const char* op, at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale, double sign) {
  check_merge_args(op, W, A, B);
  LORA_CHECK((W.size(0) + 7) / 8 <= kMaxGridY, op, ": W may have at most ", kMaxGridY * 8, " rows, got ", W.size(0));
  const c10::cuda::CUDAGuard guard(W.device());
  const at::Tensor A64 = A.to(at::kDouble).contiguous(), B64 = B.to(at::kDouble).contiguous();
  MergeParams p{W.data_ptr(), A64.const_data_ptr<double>(), B64.const_data_ptr<double>(), W.size(0), W.size(1),
                A.size(0), scale, sign,
                W.scalar_type() == at::kHalf ? DType::kFloat16
                : W.scalar_type() == at::kBFloat16 ? DType::kBFloat16
                                                   : DType::kFloat32};
  if (W.numel() > 0) {
    launch_merge(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void merge_lora_cuda(at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale) {
  merge_impl("merge_lora_", W, A, B, scale, 1.0);
}

void unmerge_lora_cuda(at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale) {
  merge_impl("unmerge_lora_", W, A, B, scale, -1.0);
}

std::tuple<at::Tensor, at::Tensor> merge_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                                  int64_t blocksize, at::IntArrayRef shape, const at::Tensor& A,
                                                  const at::Tensor& B, double scale,
                                                  const c10::optional<at::Tensor>& nested_absmax,
                                                  const c10::optional<at::Tensor>& nested_code,
                                                  const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const auto w = check_merge_nf4_args(packed, absmax, blocksize, shape, A, B, nested_absmax, nested_code, offset,
                                      nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor A64 = A.to(at::kDouble).contiguous(), B64 = B.to(at::kDouble).contiguous();
  at::Tensor packed_out = at::empty({(w.n + 1) / 2, 1}, packed.options());
  at::Tensor absmax_out = at::empty({w.nblocks}, packed.options().dtype(at::kFloat));
  nf4::MergeNf4Params p{};
  p.packed = packed.const_data_ptr<uint8_t>();
  p.scales = nf4::scale_source(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  p.blocksize_log2 = log2_exact(blocksize);
  p.A = A64.const_data_ptr<double>();
  p.B = B64.const_data_ptr<double>();
  p.n = w.n;
  p.k = shape[1];
  p.r = A.size(0);
  p.scale = scale;
  p.packed_out = packed_out.data_ptr<uint8_t>();
  p.absmax_out = absmax_out.data_ptr<float>();
  if (w.n > 0) {
    nf4::launch_merge_nf4(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed_out, absmax_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_lora_", &merge_lora_cuda);
  m.impl("unmerge_lora_", &unmerge_lora_cuda);
  m.impl("merge_nf4", &merge_nf4_cuda);
}

}  // namespace merge
}  // namespace lora_ext
