// Torch-side glue of the LoRA operators on CUDA: the Philox dropout kernel, and the low-rank products
// of lora_plan.h launched on the current stream. fp64 goes through the cuBLAS composite
// (lora_composite.h), which has the same semantics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "lora/lora_composite.h"
#include "lora/lora_cuda_glue.h"
#include "lora/lora_dtype.h"
#include "lora/lora_launch.h"
#include "lora/lora_plan.h"

namespace lora_ext {
namespace lora {
namespace {

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
  LORA_CHECK(at::isFloatingType(x.scalar_type()), "lora_dropout: input must be floating point, got ", x.scalar_type());
  return dropout_cuda_impl(x.contiguous(), dropout_spec(p, static_cast<uint64_t>(seed))).view(x.sizes());
}

// The widest output a product's grid can cover (gridDim.y <= 65535 tiles of 64 columns): the
// products' outputs are r, N (y) or K (dx) columns wide.
constexpr int64_t kMaxFeatures = 65535LL * 64;

void check_features(const LoraDims& d) {
  LORA_CHECK(d.K <= kMaxFeatures && d.N <= kMaxFeatures && d.r <= kMaxFeatures, "lora: CUDA kernels take at most ",
             kMaxFeatures, " in and out features and rank, got ", d.K, ", ", d.N, " and r = ", d.r);
}

// bf16 mma needs sm_80 code, which tensor_core_kernels_built() checks for the current GPU (a pre-sm_80
// GPU has none). LORA_EXT_TENSOR_CORES=0 keeps every product on the CUDA-core kernel, to compare the
// two (read at each call, so a benchmark can switch it).
bool tensor_cores_enabled() {
  const char* env = std::getenv("LORA_EXT_TENSOR_CORES");
  return !(env != nullptr && std::string(env) == "0") && tensor_core_kernels_built();
}

// Launches one product of a plan on the current stream, with the workspace its K split needs.
void run(LowRankGemmParams p, const at::Tensor& like) {
  TORCH_INTERNAL_ASSERT(p.N <= kMaxFeatures);
  p.tensor_cores = tensor_cores_enabled();
  at::Tensor workspace, b_parts;
  if (p.splits > 1) {
    workspace = at::empty({p.splits, p.M, p.N}, like.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  if (const int64_t n = lowrank_b_parts_size(p)) {
    b_parts = at::empty({n}, like.options().dtype(at::kBFloat16));
    p.b_parts = b_parts.data_ptr();
  }
  TORCH_INTERNAL_ASSERT(launch_lowrank_gemm(p, at::cuda::getCurrentCUDAStream()),
                        "lora: no kernel for this dtype pair");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t target_blocks() { return 2LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace

bool addend_cast_exact(const c10::optional<at::Tensor>& grad_x_base, at::ScalarType x_dtype) {
  if (!grad_x_base.has_value() || grad_x_base->scalar_type() == x_dtype) return true;
  return x_dtype == at::kFloat && is_float_type(grad_x_base->scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lowrank_forward_cuda(const LoraDims& d, const at::Tensor& x,
                                                        const at::Tensor& base_out, const at::Tensor& A32,
                                                        const at::Tensor& B32, double scale, double dropout_p,
                                                        int64_t seed, const at::Tensor& g32, const at::Tensor& bias32) {
  check_features(d);
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous(), base2 = base_out.reshape({d.M, d.N}).contiguous();
  at::Tensor T = at::empty({d.M, d.r}, x.options().dtype(at::kFloat));
  at::Tensor y = at::empty({d.M, d.N}, base_out.options());
  const Shapes s{d.M, d.K, d.N, d.r, to_dtype(x.scalar_type()), to_dtype(base_out.scalar_type())};
  const ForwardPlan plan =
      forward_plan(s, x2.const_data_ptr(), A32.const_data_ptr<float>(), B32.const_data_ptr<float>(),
                   base2.const_data_ptr(), T.data_ptr<float>(), y.data_ptr(), static_cast<float>(scale),
                   dropout_spec(dropout_p, static_cast<uint64_t>(seed)), dropout_p > 0.0, target_blocks(),
                   g32.defined() ? g32.const_data_ptr<float>() : nullptr,
                   bias32.defined() ? bias32.const_data_ptr<float>() : nullptr);
  run(plan.down, x);
  run(plan.up, x);
  return {y.view(base_out.sizes()), T};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_backward_cuda(const LoraDims& d, const at::Tensor& grad_y,
                                                                     const at::Tensor& x, const at::Tensor& T,
                                                                     const at::Tensor& A, const at::Tensor& B32,
                                                                     double scale, double dropout_p, int64_t seed,
                                                                     const c10::optional<at::Tensor>& grad_x_base) {
  check_features(d);
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).contiguous(), x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor A32 = A.to(at::kFloat).contiguous(), T32 = T.to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dT = at::empty({d.M, d.r}, f32), dB = at::empty({d.N, d.r}, f32), dAt = at::empty({d.K, d.r}, f32);
  at::Tensor dx = at::empty({d.M, d.K}, x.options());
  // The dx epilogue's addend: x's dtype (an exact cast, addend_cast_exact), contiguous M x K.
  const at::Tensor dx_base = grad_x_base.has_value()
                                 ? grad_x_base->reshape({d.M, d.K}).to(x.scalar_type()).contiguous()
                                 : at::Tensor();
  const Shapes s{d.M, d.K, d.N, d.r, to_dtype(x.scalar_type()), to_dtype(grad_y.scalar_type())};
  const BackwardPlan plan =
      backward_plan(s, dy.const_data_ptr(), x2.const_data_ptr(), A32.const_data_ptr<float>(),
                    B32.const_data_ptr<float>(), T32.const_data_ptr<float>(), dT.data_ptr<float>(),
                    dB.data_ptr<float>(), dAt.data_ptr<float>(), dx.data_ptr(),
                    dx_base.defined() ? dx_base.const_data_ptr() : nullptr, static_cast<float>(scale),
                    dropout_spec(dropout_p, static_cast<uint64_t>(seed)), dropout_p > 0.0, target_blocks());
  run(plan.dT, x);  // first: dA and dx read dT
  run(plan.dB, x);
  run(plan.dAt, x);
  run(plan.dx, x);
  // dA in A's layout and dtype, in one copy (to() of the transposed view would keep it a view for fp32)
  return {dx.view(x.sizes()), at::empty_like(A, at::MemoryFormat::Contiguous).copy_(dAt.t()), dB};
}

namespace {

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x, const at::Tensor& base_out,
                                                     const at::Tensor& A, const at::Tensor& B, double scale,
                                                     double dropout_p, int64_t seed) {
  const auto d = check_forward_args(x, base_out, A, B, dropout_p);  // first: a CPU x must get its message
  const c10::cuda::CUDAGuard guard(x.device());
  if (!is_float_type(x.scalar_type()) || !is_float_type(base_out.scalar_type()) || !is_float_type(A.scalar_type())) {
    return forward_impl(x, base_out, A, B, scale, dropout_p, seed, dropout_cuda_impl);
  }
  const auto [y, T] = lowrank_forward_cuda(d, x, base_out, A.to(at::kFloat).contiguous(),
                                           B.to(at::kFloat).contiguous(), scale, dropout_p, seed);
  return {y, T.to(A.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& T, const at::Tensor& A,
                                                                  const at::Tensor& B, double scale, double dropout_p,
                                                                  int64_t seed,
                                                                  const c10::optional<at::Tensor>& grad_x_base) {
  const auto d = check_backward_args(grad_y, x, T, A, B, dropout_p);  // first: a CPU x must get its message
  check_grad_x_base(grad_x_base, x, d);
  const c10::cuda::CUDAGuard guard(x.device());
  if (!is_float_type(grad_y.scalar_type()) || !is_float_type(x.scalar_type()) || !is_float_type(A.scalar_type()) ||
      !addend_cast_exact(grad_x_base, x.scalar_type())) {
    return backward_impl(grad_y, x, T, A, B, scale, dropout_p, seed, grad_x_base, dropout_cuda_impl);
  }
  const auto [dx, dA, dB] = lowrank_backward_cuda(d, grad_y, x, T, A, B.to(at::kFloat).contiguous(), scale,
                                                  dropout_p, seed, grad_x_base);
  return {dx, dA, dB.to(B.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_dropout", &lora_dropout_cuda);
  m.impl("lora_forward", &lora_forward_cuda);
  m.impl("lora_backward", &lora_backward_cuda);
}

}  // namespace lora
}  // namespace lora_ext
