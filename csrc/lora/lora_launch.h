// Parameters and launchers of the LoRA CUDA kernels (plain C++: no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora/lora_common.h"

namespace lora_ext {
namespace lora {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct DropoutParams {
  const void* x;  // n contiguous elements
  void* out;
  int64_t n;
  DropoutSpec spec;
  DType dtype;
};

void launch_dropout(const DropoutParams& p, cudaStream_t stream);

// One skinny product of the LoRA branch: out (M x N, contiguous) = alpha * a (M x K) * b (K x N)
// [+ addend], fp32 accumulation, rounded once to out_dtype. Operands are read through strides, so
// the transposes the backward needs (dy^T, x^T) are never copied. a is the big operand (x, dy) in
// the activation dtype, or fp32 (T, dT); b is always fp32 and small (the adapters, T, dT).
struct LowRankGemmParams {
  const void* a;
  int64_t a_stride_m, a_stride_k;
  DType a_dtype;  // any of fp32/fp16/bf16 when out is fp32; fp32 otherwise
  const float* b;
  int64_t b_stride_k, b_stride_n;
  const void* addend;  // M x N contiguous in out_dtype, or null
  void* out;
  DType out_dtype;
  float* workspace;  // splits * M * N floats when splits > 1: one partial sum per K slice
  int64_t M, N, K;
  int splits;  // K is cut into this many slices, summed in order afterwards (deterministic)
  float alpha;
  bool dropout_a;    // a's elements dropped by their offset in a (a is x: the element index of x)
  bool dropout_out;  // alpha * acc dropped by its index i * N + j in out (out is dx)
  DropoutSpec dropout;
  // DoRA's y: the finished value times col_scale[j] (g = m / ||W + s B A||), plus col_bias[j]; each
  // fp32, N long, or null (no scale, no bias).
  const float* col_scale;
  const float* col_bias;
  bool tensor_cores;  // the GPU has bf16 mma (sm_80+) and they are not turned off: see lora_gemm_tc.cuh
  void* b_parts;      // lowrank_b_parts_size(p) bf16 elements of workspace when that is not 0
};

// The length of each of the `splits` slices K is cut into: a whole number of steps of 16, so both
// kernels' K loops tile it; 0 for K = 0. The plan and the kernels share it.
LORA_HD int64_t k_slice_length(int64_t K, int splits) { return ((K + splits - 1) / splits + 15) / 16 * 16; }

// Whether this build's tensor-core kernel has real code for the current GPU: not so when the GPU's
// code is JIT-compiled from pre-sm_80 PTX (the kernel is then a trapping stub).
bool tensor_core_kernels_built();
// bf16 elements of the b_parts workspace a product needs: 3 * K * N when it runs on the tensor-core
// kernel (b split into three bf16 parts once, not by every block), else 0.
int64_t lowrank_b_parts_size(const LowRankGemmParams& p);
// Blocks of output a launch makes before any K split, to choose `splits`.
int64_t lowrank_gemm_tiles(int64_t M, int64_t N);
// false (nothing launched) for a dtype pair the LoRA branch does not use.
bool launch_lowrank_gemm(const LowRankGemmParams& p, cudaStream_t stream);

}  // namespace lora
}  // namespace lora_ext
