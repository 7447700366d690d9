// CPU NF4 kernels other CPU files build on (nf4_matmul_cpu.cpp dequantizes into its workspace,
// merge_nf4_cpu.cpp requantizes merged blocks).
#pragma once

#include <ATen/ATen.h>

#include "nf4/nf4_checks.h"

namespace lora_ext {
namespace nf4 {

// Block scales of a checked NF4 weight on the CPU (the double-quant offset read once).
inline BlockScales cpu_block_scales(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                    const c10::optional<at::Tensor>& nested_code,
                                    const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  BlockScales s;
  if (nested_absmax.has_value()) {
    s.qabsmax = absmax.const_data_ptr<uint8_t>();
    s.nested = nested_absmax->const_data_ptr<float>();
    s.code8 = nested_code->const_data_ptr<float>();
    s.offset = offset->item<float>();
    s.nested_log2 = log2_exact(nested_blocksize);
  } else {
    s.absmax = absmax.const_data_ptr<float>();
  }
  return s;
}

// Dequantize a checked NF4 weight into `out` (contiguous, float32/float16/bfloat16, args.n elements).
void dequantize_into_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, const DequantArgs& args,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         const c10::optional<at::Tensor>& offset, int64_t nested_blocksize, at::Tensor& out);

// NF4-quantize one block of fp32 values (bitsandbytes' rules; `partial`: the trailing short block).
void quantize_block_f32(const float* x, int64_t len, bool partial, float* absmax_out, uint8_t* packed);

}  // namespace nf4
}  // namespace lora_ext
