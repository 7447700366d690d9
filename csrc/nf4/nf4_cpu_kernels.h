// CPU NF4 kernels other CPU files build on (nf4_matmul_cpu.cpp dequantizes into its workspace,
// merge_nf4_cpu.cpp requantizes merged blocks).
#pragma once

#include <ATen/ATen.h>

#include "nf4/nf4_checks.h"

namespace lora_ext {
namespace nf4 {

// Dequantize a checked NF4 weight into `out` (contiguous, float32/float16/bfloat16, args.n elements).
void dequantize_into_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, const DequantArgs& args,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         const c10::optional<at::Tensor>& offset, int64_t nested_blocksize, at::Tensor& out);

// NF4-quantize one block of fp32 values (bitsandbytes' rules; `partial`: the trailing short block).
void quantize_block_f32(const float* x, int64_t len, bool partial, float* absmax_out, uint8_t* packed);

}  // namespace nf4
}  // namespace lora_ext
