// Shape and dtype rules of the NF4 operators, shared by the CPU and CUDA glue so both devices
// refuse the same inputs with the same words.
#pragma once

#include <c10/util/Optional.h>

#include "common/checks.h"
#include "nf4/nf4_common.h"

namespace lora_ext {
namespace nf4 {

inline void check_blocksize(int64_t blocksize, const char* what = "blocksize") {
  LORA_CHECK(is_pow2(blocksize) && blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize, what,
             " must be a power of two in [", kMinBlocksize, ", ", kMaxBlocksize, "], got ", blocksize);
}

inline int64_t shape_numel(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto s : shape) {
    LORA_CHECK(s >= 0, "shape must have non-negative sizes, got ", shape);
    n *= s;
  }
  return n;
}

inline void check_quantize_args(const at::Tensor& A, int64_t blocksize) {
  check_float_type(A.scalar_type(), "quantize_nf4: input");
  check_blocksize(blocksize);
}

inline void check_double_quant_args(const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  check_dtype(absmax, at::kFloat, "double_quant: absmax");
  check_dtype(code, at::kFloat, "double_quant: code");
  check_numel(code, kDynCodes, "double_quant: code");
  check_same_device(code, absmax, "double_quant: code");
  check_contiguous(code, "double_quant: code");
  LORA_CHECK(is_pow2(blocksize) && blocksize >= 32 && blocksize <= 4096,
             "double_quant: blocksize must be a power of two in [32, 4096], got ", blocksize);
}

struct DequantArgs {
  int64_t n;
  int64_t nblocks;
  bool nested;
};

inline DequantArgs check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                         at::IntArrayRef shape, at::ScalarType dtype,
                                         const c10::optional<at::Tensor>& nested_absmax,
                                         const c10::optional<at::Tensor>& nested_code,
                                         const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  check_blocksize(blocksize);
  check_float_type(dtype, "dequantize_nf4: dtype");
  const int64_t n = shape_numel(shape);
  const int64_t nblocks = ceil_div(n, blocksize);
  check_dtype(packed, at::kByte, "dequantize_nf4: packed weight (view other quant_storage as uint8)");
  check_contiguous(packed, "dequantize_nf4: packed weight");
  check_numel(packed, (n + 1) / 2, "dequantize_nf4: packed weight of a shape with this many elements");
  check_same_device(absmax, packed, "dequantize_nf4: absmax");
  check_contiguous(absmax, "dequantize_nf4: absmax");
  check_numel(absmax, nblocks, "dequantize_nf4: absmax (one per block)");
  const bool nested = nested_absmax.has_value();
  LORA_CHECK(nested == nested_code.has_value() && nested == offset.has_value(),
             "dequantize_nf4: nested_absmax, nested_code and offset must be given together");
  if (!nested) {
    check_dtype(absmax, at::kFloat, "dequantize_nf4: absmax");
    return {n, nblocks, false};
  }
  check_dtype(absmax, at::kByte, "dequantize_nf4: absmax under double quantization");
  LORA_CHECK(is_pow2(nested_blocksize) && nested_blocksize >= 32 && nested_blocksize <= 4096,
             "dequantize_nf4: nested_blocksize must be a power of two in [32, 4096], got ", nested_blocksize);
  const auto& na = *nested_absmax;
  const auto& nc = *nested_code;
  const auto& off = *offset;
  check_dtype(na, at::kFloat, "dequantize_nf4: nested_absmax");
  check_contiguous(na, "dequantize_nf4: nested_absmax");
  check_numel(na, ceil_div(nblocks, nested_blocksize), "dequantize_nf4: nested_absmax (one per nested block)");
  check_dtype(nc, at::kFloat, "dequantize_nf4: nested_code");
  check_contiguous(nc, "dequantize_nf4: nested_code");
  check_numel(nc, kDynCodes, "dequantize_nf4: nested_code");
  check_dtype(off, at::kFloat, "dequantize_nf4: offset");
  check_numel(off, 1, "dequantize_nf4: offset");
  check_same_device(na, packed, "dequantize_nf4: nested_absmax");
  check_same_device(nc, packed, "dequantize_nf4: nested_code");
  check_same_device(off, packed, "dequantize_nf4: offset");
  return {n, nblocks, true};
}

// The dtype a weight is dequantized to for an activation dtype (float64 uses the exact fp32 values).
inline at::ScalarType weight_dtype(at::ScalarType activation) {
  return activation == at::kDouble ? at::kFloat : activation;
}

// Checks of nf4_linear_grad_input: dy (..., N) against an N x in_features NF4 weight.
struct LinearArgs {
  int64_t M;  // rows of x after flattening the leading dims
  int64_t N;  // out_features
  int64_t K;  // in_features
  DequantArgs weight;
};

// y = x W^T (+ bias) with W (out_features x K) in NF4.
inline LinearArgs check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& packed,
                                    const at::Tensor& absmax, int64_t out_features, int64_t blocksize,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& nested_absmax,
                                    const c10::optional<at::Tensor>& nested_code,
                                    const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  // float64 is accepted for gradcheck: it runs the BLAS path on the exact fp32 dequantized weight.
  LORA_CHECK(is_float_or_double(x.scalar_type()), op,
             ": input must be float32, float16 or bfloat16 (or float64), got ", x.scalar_type());
  LORA_CHECK(x.dim() >= 1, op, ": input must have at least one dimension, got a scalar");
  LORA_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  check_same_device(packed, x, op);
  const int64_t K = x.size(-1);
  const auto w = check_dequantize_args(packed, absmax, blocksize, {out_features, K}, weight_dtype(x.scalar_type()),
                                       nested_absmax, nested_code, offset, nested_blocksize);
  if (bias.has_value()) {
    check_same_device(*bias, x, "nf4 linear: bias");
    LORA_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have the input's dtype ", x.scalar_type(),
               ", got ", bias->scalar_type());
    LORA_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape (", out_features,
               ",), got ", bias->sizes());
  }
  const int64_t M = leading_rows(x);
  return {M, out_features, K, w};
}

inline LinearArgs check_grad_input_args(const at::Tensor& grad_out, const at::Tensor& packed,
                                        const at::Tensor& absmax, int64_t in_features, int64_t blocksize,
                                        const c10::optional<at::Tensor>& nested_absmax,
                                        const c10::optional<at::Tensor>& nested_code,
                                        const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const char* op = "nf4_linear_grad_input";
  LORA_CHECK(is_float_or_double(grad_out.scalar_type()), op,
             ": grad_output must be float32, float16 or bfloat16 (or float64), got ", grad_out.scalar_type());
  LORA_CHECK(grad_out.dim() >= 1, op, ": grad_output must have at least one dimension");
  LORA_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_same_device(packed, grad_out, op);
  const int64_t N = grad_out.size(-1);
  const auto w = check_dequantize_args(packed, absmax, blocksize, {N, in_features},
                                       weight_dtype(grad_out.scalar_type()), nested_absmax, nested_code, offset,
                                       nested_blocksize);
  const int64_t M = leading_rows(grad_out);
  return {M, N, in_features, w};
}

inline void check_dequantize_out(const at::Tensor& out, const at::Tensor& packed) {
  check_float_type(out.scalar_type(), "dequantize_nf4_out: out");
  check_contiguous(out, "dequantize_nf4_out: out");
  check_same_device(out, packed, "dequantize_nf4_out: out");
}

}  // namespace nf4
}  // namespace lora_ext
