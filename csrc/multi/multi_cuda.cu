// Launchers of the mixed-batch LoRA kernels (multi_gemm.cuh): the shrink, then the expand, on one stream.
#include "common/launch.cuh"
#include "multi/multi_gemm.cuh"

namespace lora_ext {
namespace multi {
namespace {

template <typename TX>
void launch_shrink(const MultiLoraParams& p, cudaStream_t stream) {
  launch_kernel(kern::shrink_kernel<TX>, kern::shrink_grid(p), kern::kThreads, stream, p);
}

template <typename TY>
void launch_expand(const MultiLoraParams& p, cudaStream_t stream) {
  launch_kernel(kern::expand_kernel<TY>, kern::expand_grid(p), kern::kThreads, stream, p);
}

bool is_16_or_32_bit(DType t) { return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16; }

}  // namespace

bool launch_multi_lora(const MultiLoraParams& p, cudaStream_t stream) {
  if (!is_16_or_32_bit(p.x_dtype) || !is_16_or_32_bit(p.y_dtype)) return false;
  if (p.n_tiles == 0 || p.M == 0 || p.N == 0 || p.r_max == 0) return true;
  switch (p.x_dtype) {
    case DType::kFloat16: launch_shrink<__half>(p, stream); break;
    case DType::kBFloat16: launch_shrink<__nv_bfloat16>(p, stream); break;
    default: launch_shrink<float>(p, stream); break;
  }
  switch (p.y_dtype) {
    case DType::kFloat16: launch_expand<__half>(p, stream); break;
    case DType::kBFloat16: launch_expand<__nv_bfloat16>(p, stream); break;
    default: launch_expand<float>(p, stream); break;
  }
  return true;
}

}  // namespace multi
}  // namespace lora_ext
