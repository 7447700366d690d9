// CUDA NF4 host functions other CUDA glue builds on (nf4_matmul_cuda_api.cpp).
#pragma once

#include <ATen/ATen.h>

#include "nf4/nf4_checks.h"
#include "nf4/nf4_launch.h"

namespace lora_ext {
namespace nf4 {

DType to_dtype(at::ScalarType t);

// Device pointers of a checked NF4 weight's block scales (plain or double-quantized).
inline ScaleSource scale_source(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                                int64_t nested_blocksize) {
  if (!nested_absmax.has_value()) return ScaleSource::plain(absmax.const_data_ptr<float>());
  return ScaleSource::nested(absmax.const_data_ptr<uint8_t>(), nested_absmax->const_data_ptr<float>(),
                             nested_code->const_data_ptr<float>(), offset->const_data_ptr<float>(),
                             log2_exact(nested_blocksize));
}

// Dequantize a checked NF4 weight into `out` on the current stream (caller holds the device guard).
void dequantize_into_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                          const DequantArgs& args, const c10::optional<at::Tensor>& nested_absmax,
                          const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                          int64_t nested_blocksize, at::Tensor& out);

}  // namespace nf4
}  // namespace lora_ext
