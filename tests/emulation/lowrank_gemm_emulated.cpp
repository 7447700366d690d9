// csrc/lora/lora_gemm.cuh's kernels run on the CPU (cuda_emulation.h), behind a C entry point that
// tests/test_lora_kernels_emulated.py calls through ctypes with the operands the CUDA glue would pass.
#include "cuda_emulation.h"
#include "lora/lora_gemm.cuh"

using namespace lora_ext::lora;

extern "C" int lowrank_gemm_emulated(const void* a, int64_t a_stride_m, int64_t a_stride_k, int a_dtype,
                                     const float* b, int64_t b_stride_k, int64_t b_stride_n, const void* addend,
                                     void* out, int out_dtype, float* workspace, int64_t M, int64_t N, int64_t K,
                                     int splits, float alpha, int dropout_a, int dropout_out, double dropout_p,
                                     uint64_t seed) {
  LowRankGemmParams p{};
  p.a = a;
  p.a_stride_m = a_stride_m;
  p.a_stride_k = a_stride_k;
  p.a_dtype = static_cast<DType>(a_dtype);
  p.b = b;
  p.b_stride_k = b_stride_k;
  p.b_stride_n = b_stride_n;
  p.addend = addend;
  p.out = out;
  p.out_dtype = static_cast<DType>(out_dtype);
  p.workspace = workspace;
  p.M = M;
  p.N = N;
  p.K = K;
  p.splits = splits;
  p.alpha = alpha;
  p.dropout_a = dropout_a != 0;
  p.dropout_out = dropout_out != 0;
  p.dropout = dropout_spec(dropout_p, seed);
  if (M == 0 || N == 0) return 1;
  using namespace lowrank;
  return dispatch_pair(p, [&]<typename TA, typename TC>() {
    if (tile_n(p.N) == 1) {
      cuda_emulation::launch(gemm_grid(p), kThreads, [&] { lowrank_gemm_kernel<TA, TC, 1>(p); });
    } else {
      cuda_emulation::launch(gemm_grid(p), kThreads, [&] { lowrank_gemm_kernel<TA, TC, 4>(p); });
    }
    if (p.splits > 1) cuda_emulation::launch(split_sum_grid(p), kThreads, [&] { split_sum_kernel<TC>(p); });
  }) ? 1 : 0;
}
