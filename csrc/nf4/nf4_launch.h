// Plain parameter structs and launchers of the NF4 CUDA kernels. Included by nf4_cuda.cu and by
// the torch-side glue nf4_cuda_api.cpp; no torch headers here, so the .cu compiles fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lora_ext {
namespace nf4 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Where block b's absmax lives on the device: plain float32 (absmax), or double-quantized (qabsmax
// decoded with the other four; offset is a device scalar).
struct ScaleSource {
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;
  int nested_blocksize_log2 = 8;

  static ScaleSource plain(const float* absmax) {
    ScaleSource s;
    s.absmax = absmax;
    return s;
  }
  static ScaleSource nested(const uint8_t* qabsmax, const float* nested_absmax, const float* nested_code,
                            const float* offset, int nested_blocksize_log2) {
    ScaleSource s;
    s.qabsmax = qabsmax;
    s.nested_absmax = nested_absmax;
    s.nested_code = nested_code;
    s.offset = offset;
    s.nested_blocksize_log2 = nested_blocksize_log2;
    return s;
  }
};

struct QuantizeParams {
  const void* x;       // n elements of `dtype`
  uint8_t* packed;     // (n + 1) / 2 bytes
  float* absmax;       // ceil(n / blocksize)
  int64_t n;
  int blocksize_log2;
  DType dtype;
};

struct DoubleQuantParams {
  const float* absmax;  // n
  const float* offset;  // device scalar: mean(absmax)
  const float* code;    // 256 entries, sorted
  uint8_t* qabsmax;     // n
  float* nested_absmax; // ceil(n / blocksize)
  int64_t n;
  int blocksize_log2;
};

struct DequantizeParams {
  const uint8_t* packed;
  ScaleSource scales;
  void* out;
  int64_t n;
  int blocksize_log2;
  DType dtype;
};

// dequant(W) + scale * B A requantized (one pass over the blocks): W is n = d * k NF4 codes.
struct MergeNf4Params {
  const uint8_t* packed;
  ScaleSource scales;
  int blocksize_log2;
  const double* A;  // r x k
  const double* B;  // d x r
  int64_t n, k, r;
  double scale;
  uint8_t* packed_out;
  float* absmax_out;
};

// Launch on `stream`; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
void launch_merge_nf4(const MergeNf4Params& p, cudaStream_t stream);
void launch_quantize_nf4(const QuantizeParams& p, cudaStream_t stream);
void launch_double_quant(const DoubleQuantParams& p, cudaStream_t stream);
void launch_dequantize_nf4(const DequantizeParams& p, cudaStream_t stream);

}  // namespace nf4
}  // namespace lora_ext
