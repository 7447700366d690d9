// Launchers of the LoRA low-rank kernels (lora_gemm.cuh): one launch per product of the LoRA
// branch, plus the in-order sum of the K slices when a product's K was split.
#include "common/launch.cuh"
#include "lora/lora_gemm.cuh"
#include "lora/lora_gemm_tc.cuh"

namespace lora_ext {
namespace lora {

int64_t lowrank_gemm_tiles(int64_t M, int64_t N) {
  return lowrank::ceil_div(M, lowrank::kBM) * lowrank::ceil_div(N, 16 * lowrank::tile_n(N));
}

bool tensor_core_kernels_built() {
#if defined(LORA_EXT_CUDA_EMULATION)
  return true;
#else
  static const bool built = [] {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, lowrank_tc::lowrank_tc_kernel<float, float, 16>) != cudaSuccess) {
      (void)cudaGetLastError();  // not left for the next launch check to find
      return false;
    }
    return attr.ptxVersion >= 80;
  }();
  return built;
#endif
}

bool launch_lowrank_gemm(const LowRankGemmParams& p, cudaStream_t stream) {
  using namespace lowrank;
  if (p.M == 0 || p.N == 0) return true;
  if (lowrank_tc::eligible(p)) {
    lowrank_tc::dispatch_pair(p, [&]<typename TA, typename TC>() {
      using lowrank_tc::lowrank_tc_kernel;
      const dim3 grid = lowrank_tc::grid(p);
      switch (lowrank_tc::tile_n(p.N)) {
        case 16: launch_kernel(lowrank_tc_kernel<TA, TC, 16>, grid, lowrank_tc::kThreads, stream, p); break;
        case 32: launch_kernel(lowrank_tc_kernel<TA, TC, 32>, grid, lowrank_tc::kThreads, stream, p); break;
        default: launch_kernel(lowrank_tc_kernel<TA, TC, 64>, grid, lowrank_tc::kThreads, stream, p); break;
      }
      if (p.splits > 1) launch_kernel(split_sum_kernel<TC>, split_sum_grid(p), kThreads, stream, p);
    });
    return true;
  }
  return dispatch_pair(p, [&]<typename TA, typename TC>() {
    if (tile_n(p.N) == 1) {
      launch_kernel(lowrank_gemm_kernel<TA, TC, 1>, gemm_grid(p), kThreads, stream, p);
    } else {
      launch_kernel(lowrank_gemm_kernel<TA, TC, 4>, gemm_grid(p), kThreads, stream, p);
    }
    if (p.splits > 1) launch_kernel(split_sum_kernel<TC>, split_sum_grid(p), kThreads, stream, p);
  });
}

}  // namespace lora
}  // namespace lora_ext
