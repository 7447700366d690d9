// Parameters and launcher of the fused NF4 GEMV (small M). Plain C++: shared by
// nf4_matmul_cuda.cu and its torch-side glue nf4_matmul_cuda_api.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nf4/nf4_launch.h"

namespace lora_ext {
namespace nf4 {

struct GemvParams {
  const void* x;      // M x K, rows ldx elements apart
  const uint8_t* packed;  // N x K NF4 weight, flattened row-major
  ScaleSource scales;
  const void* bias;   // N, or null
  void* y;            // M x N, contiguous
  int64_t M, N, K, ldx;
  int blocksize_log2;
  DType dtype;
};

// y = x W^T (+ bias) reading the packed weight once per tile of x rows; fp32 accumulation.
void launch_nf4_gemv(const GemvParams& p, cudaStream_t stream);

}  // namespace nf4
}  // namespace lora_ext
