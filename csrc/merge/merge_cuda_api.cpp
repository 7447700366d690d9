// Torch-side glue of the CUDA merge: checks (before W is touched), fp64 copies of the small
// adapters, device guard, current stream, launch check.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "merge/merge_checks.h"
#include "merge/merge_launch.h"

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

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_lora_", &merge_lora_cuda);
  m.impl("unmerge_lora_", &unmerge_lora_cuda);
}

}  // namespace merge
}  // namespace lora_ext
