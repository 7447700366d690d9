// Torch-side glue of the LoRA operators on CUDA: the Philox dropout kernel, and the low-rank products
// as launches of lora_gemm_cuda.cu's kernel on the current stream. fp64 goes through the cuBLAS
// composite (lora_composite.h), which has the same semantics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

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

// A matrix operand of a low-rank product, read through strides: rows x cols of `t`'s storage.
struct Operand {
  const at::Tensor& t;  // contiguous
  int64_t rows, cols, row_stride, col_stride;
};

Operand as_is(const at::Tensor& t) { return {t, t.size(0), t.size(1), t.size(1), 1}; }
Operand transposed(const at::Tensor& t) { return {t, t.size(1), t.size(0), 1, t.size(1)}; }

struct Epilogue {
  float alpha = 1.0f;
  const at::Tensor* addend = nullptr;  // out's shape and dtype
  bool dropout_a = false, dropout_out = false;
  DropoutSpec dropout{};
};

// out (contiguous, a.rows x b.cols) = alpha * a b [+ addend], fp32 accumulation, one rounding.
void lowrank_gemm(const Operand& a, const Operand& b, at::Tensor& out, const Epilogue& ep) {
  TORCH_INTERNAL_ASSERT(a.cols == b.rows && b.t.scalar_type() == at::kFloat && out.is_contiguous());
  LowRankGemmParams p{};
  p.a = a.t.const_data_ptr();
  p.a_stride_m = a.row_stride;
  p.a_stride_k = a.col_stride;
  p.a_dtype = to_dtype(a.t.scalar_type());
  p.b = b.t.const_data_ptr<float>();
  p.b_stride_k = b.row_stride;
  p.b_stride_n = b.col_stride;
  p.addend = ep.addend != nullptr ? ep.addend->const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = to_dtype(out.scalar_type());
  p.M = a.rows;
  p.N = b.cols;
  p.K = a.cols;
  p.alpha = ep.alpha;
  p.dropout_a = ep.dropout_a;
  p.dropout_out = ep.dropout_out;
  p.dropout = ep.dropout;
  LORA_CHECK(p.N <= 65535LL * 64, "lora: a low-rank product's output is at most ", 65535LL * 64,
             " columns wide (the layer's in or out features), got ", p.N);
  // Too few output tiles to fill the GPU (the reductions over tokens): cut K into slices of at
  // least 512, summed afterwards in a fixed order.
  const int64_t target = 2LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = std::max<int64_t>(1, lowrank_gemm_tiles(p.M, p.N));
  p.splits = static_cast<int>(std::clamp<int64_t>((target + tiles - 1) / tiles, 1, std::max<int64_t>(1, p.K / 512)));
  at::Tensor workspace;
  if (p.splits > 1) {
    workspace = at::empty({p.splits, p.M, p.N}, out.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  TORCH_INTERNAL_ASSERT(launch_lowrank_gemm(p, at::cuda::getCurrentCUDAStream()), "lora: no kernel for ",
                        a.t.scalar_type(), " -> ", out.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x, const at::Tensor& base_out,
                                                     const at::Tensor& A, const at::Tensor& B, double scale,
                                                     double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto d = check_forward_args(x, base_out, A, B, dropout_p);
  if (!kernel_dtype(x.scalar_type()) || !kernel_dtype(base_out.scalar_type()) || !kernel_dtype(A.scalar_type())) {
    return forward_impl(x, base_out, A, B, scale, dropout_p, seed, dropout_cuda_impl);
  }
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor A32 = A.to(at::kFloat).contiguous(), B32 = B.to(at::kFloat).contiguous();
  at::Tensor T = at::empty({d.M, d.r}, x.options().dtype(at::kFloat));
  Epilogue down;
  down.dropout_a = dropout_p > 0.0;
  down.dropout = dropout_spec(dropout_p, static_cast<uint64_t>(seed));
  lowrank_gemm(as_is(x2), transposed(A32), T, down);

  const at::Tensor base2 = base_out.reshape({d.M, d.N}).contiguous();
  at::Tensor y = at::empty({d.M, d.N}, base_out.options());
  Epilogue up;
  up.alpha = static_cast<float>(scale);
  up.addend = &base2;
  lowrank_gemm(as_is(T), transposed(B32), y, up);
  return {y.view(base_out.sizes()), T.to(A.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& T, const at::Tensor& A,
                                                                  const at::Tensor& B, double scale, double dropout_p,
                                                                  int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto d = check_backward_args(grad_y, x, T, A, B, dropout_p);
  if (!kernel_dtype(grad_y.scalar_type()) || !kernel_dtype(x.scalar_type()) || !kernel_dtype(A.scalar_type())) {
    return backward_impl(grad_y, x, T, A, B, scale, dropout_p, seed, dropout_cuda_impl);
  }
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).contiguous();
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor A32 = A.to(at::kFloat).contiguous(), B32 = B.to(at::kFloat).contiguous();
  const at::Tensor T32 = T.to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  Epilogue scaled;
  scaled.alpha = static_cast<float>(scale);
  Epilogue dropped;
  dropped.dropout = dropout_spec(dropout_p, static_cast<uint64_t>(seed));

  at::Tensor dT = at::empty({d.M, d.r}, f32);
  lowrank_gemm(as_is(dy), as_is(B32), dT, scaled);
  at::Tensor dB = at::empty({d.N, d.r}, f32);
  lowrank_gemm(transposed(dy), as_is(T32), dB, scaled);
  // dA^T = dropout(x)^T dT (K x r): the small dimension r is the output's columns, as the kernel's
  // narrow tile wants; transposed back below (r x K floats, small).
  at::Tensor dAt = at::empty({d.K, d.r}, f32);
  dropped.dropout_a = dropout_p > 0.0;
  lowrank_gemm(transposed(x2), as_is(dT), dAt, dropped);
  at::Tensor dx = at::empty({d.M, d.K}, x.options());
  dropped.dropout_a = false;
  dropped.dropout_out = dropout_p > 0.0;
  lowrank_gemm(as_is(dT), as_is(A32), dx, dropped);
  return {dx.view(x.sizes()), dAt.t().contiguous().to(A.scalar_type()), dB.to(B.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_dropout", &lora_dropout_cuda);
  m.impl("lora_forward", &lora_forward_cuda);
  m.impl("lora_backward", &lora_backward_cuda);
}

}  // namespace lora
}  // namespace lora_ext
