// Launchers of the LoRA low-rank kernels (lora_gemm.cuh): one launch per product of the LoRA
// branch, plus the in-order sum of the K slices when a product's K was split.
#include <atomic>

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
  // Per device: a process may see GPUs of different architectures. 0 unknown, 1 no, 2 yes.
  static std::atomic<int8_t> known[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    (void)cudaGetLastError();
    return false;
  }
  if (const int8_t k = known[device].load(std::memory_order_relaxed)) return k == 2;
  cudaFuncAttributes attr{};
  bool built = cudaFuncGetAttributes(&attr, lowrank_tc::lowrank_tc_kernel<float, float, 16>) == cudaSuccess;
  if (!built) (void)cudaGetLastError();  // not left for the next launch check to find
  // No sm_80+ image for this GPU fails above; code JIT-compiled from pre-sm_80 PTX is the trapping stub.
  built = built && attr.ptxVersion >= 80;
  known[device].store(built ? 2 : 1, std::memory_order_relaxed);
  return built;
#endif
}

int64_t lowrank_b_parts_size(const LowRankGemmParams& p) { return lowrank_tc::eligible(p) ? 3 * p.K * p.N : 0; }

namespace {

// The launches for one (a, out) dtype pair, as functors with a member template: plain C++17 (torch
// 2.11 builds with -std=c++17, where template lambdas are an extension nvcc warns about).
struct LaunchTensorCore {
  const LowRankGemmParams& p;
  cudaStream_t stream;
  template <typename TA, typename TC>
  void run() const {
    using lowrank_tc::lowrank_tc_kernel;
    const dim3 grid = lowrank_tc::grid(p);
    switch (lowrank_tc::tile_n(p.N)) {
      case 16: launch_kernel(lowrank_tc_kernel<TA, TC, 16>, grid, lowrank_tc::kThreads, stream, p); break;
      case 32: launch_kernel(lowrank_tc_kernel<TA, TC, 32>, grid, lowrank_tc::kThreads, stream, p); break;
      default: launch_kernel(lowrank_tc_kernel<TA, TC, 64>, grid, lowrank_tc::kThreads, stream, p); break;
    }
    if (p.splits > 1) {
      launch_kernel(lowrank::split_sum_kernel<TC>, lowrank::split_sum_grid(p), lowrank::kThreads, stream, p);
    }
  }
};

struct LaunchCudaCore {
  const LowRankGemmParams& p;
  cudaStream_t stream;
  template <typename TA, typename TC>
  void run() const {
    using namespace lowrank;
    if (tile_n(p.N) == 1) {
      launch_kernel(lowrank_gemm_kernel<TA, TC, 1>, gemm_grid(p), kThreads, stream, p);
    } else {
      launch_kernel(lowrank_gemm_kernel<TA, TC, 4>, gemm_grid(p), kThreads, stream, p);
    }
    if (p.splits > 1) launch_kernel(split_sum_kernel<TC>, split_sum_grid(p), kThreads, stream, p);
  }
};

}  // namespace

bool launch_lowrank_gemm(const LowRankGemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return true;
  if (lowrank_tc::eligible(p)) {
    if (p.b_parts == nullptr) return false;  // the caller sizes it by lowrank_b_parts_size
    launch_kernel(lowrank_tc::split_b_kernel, grid_for(p.K * p.N, lowrank::kThreads), lowrank::kThreads, stream, p);
    lowrank_tc::dispatch_pair(p, LaunchTensorCore{p, stream});
    return true;
  }
  return lowrank::dispatch_pair(p, LaunchCudaCore{p, stream});
}

}  // namespace lora
}  // namespace lora_ext
