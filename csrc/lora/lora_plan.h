// The six low-rank products of the LoRA branch as LowRankGemmParams: for each, which buffer is read
// through which strides, and which epilogue applies. The CUDA glue (lora_cuda_api.cpp) launches
// this plan, and tests/emulation runs the same plan on the CPU. Plain C++: no torch headers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lora/lora_launch.h"

namespace lora_ext {
namespace lora {

// A matrix operand read through strides: rows x cols, element (i, j) at ptr[i * row_stride + j * col_stride].
struct Operand {
  const void* ptr;
  DType dtype;
  int64_t rows, cols, row_stride, col_stride;
};

// The contiguous rows x cols matrix at ptr, as it is, or transposed (read, never copied).
inline Operand as_is(const void* ptr, DType dtype, int64_t rows, int64_t cols) {
  return {ptr, dtype, rows, cols, cols, 1};
}
inline Operand transposed(const void* ptr, DType dtype, int64_t rows, int64_t cols) {
  return {ptr, dtype, cols, rows, 1, cols};
}

struct Epilogue {
  float alpha = 1.0f;
  const void* addend = nullptr;  // out's shape and dtype
  bool dropout_a = false, dropout_out = false;
  DropoutSpec dropout{};
  const float* col_scale = nullptr;  // DoRA's y: times g_j, plus bias_j (LowRankGemmParams)
  const float* col_bias = nullptr;
};

inline Epilogue scaled(float alpha, const void* addend = nullptr, const float* col_scale = nullptr,
                       const float* col_bias = nullptr) {
  return {alpha, addend, false, false, {}, col_scale, col_bias};
}
// x's dropout on the a operand (x itself), or on the output (dx, then + addend); `on` false: no dropout.
inline Epilogue dropout_on_a(const DropoutSpec& d, bool on) { return {1.0f, nullptr, on, false, d}; }
inline Epilogue dropout_on_out(const DropoutSpec& d, bool on, const void* addend = nullptr) {
  return {1.0f, addend, false, on, d};
}

// out (contiguous, a.rows x b.cols) = alpha * a b [+ addend]. When the output has too few tiles to
// fill `target_blocks` (the reductions over tokens), K is cut into slices of at least 512; the
// caller then provides splits * M * N floats of workspace.
inline LowRankGemmParams gemm_params(const Operand& a, const Operand& b, void* out, DType out_dtype,
                                     const Epilogue& ep, int64_t target_blocks) {
  LowRankGemmParams p{};
  p.a = a.ptr;
  p.a_stride_m = a.row_stride;
  p.a_stride_k = a.col_stride;
  p.a_dtype = a.dtype;
  p.b = static_cast<const float*>(b.ptr);
  p.b_stride_k = b.row_stride;
  p.b_stride_n = b.col_stride;
  p.addend = ep.addend;
  p.out = out;
  p.out_dtype = out_dtype;
  p.M = a.rows;
  p.N = b.cols;
  p.K = a.cols;
  p.alpha = ep.alpha;
  p.dropout_a = ep.dropout_a;
  p.dropout_out = ep.dropout_out;
  p.dropout = ep.dropout;
  p.col_scale = ep.col_scale;
  p.col_bias = ep.col_bias;
  const int64_t tiles = std::max<int64_t>(1, lowrank_gemm_tiles(p.M, p.N));
  const int64_t splits = std::clamp<int64_t>((target_blocks + tiles - 1) / tiles, 1, std::max<int64_t>(1, p.K / 512));
  // Drop the slices that k_slice_length's rounding leaves empty (from the smaller count it gives the
  // same length).
  const int64_t slice = k_slice_length(p.K, static_cast<int>(splits));
  p.splits = slice == 0 ? 1 : static_cast<int>((p.K + slice - 1) / slice);
  return p;
}

// Sizes and dtypes of one call: x is M x K, the layer's output M x N, rank r. The adapters are fp32
// copies (A32: r x K, B32: N x r) and so are T, dT, dA^T and dB.
struct Shapes {
  int64_t M, K, N, r;
  DType x_dtype, y_dtype;  // activations in, base output / grad_output
};

struct ForwardPlan {
  LowRankGemmParams down;  // T = dropout(x) A^T
  LowRankGemmParams up;    // y = base + s T B^T; DoRA's: g * (base + s T B^T) + bias
};

// g and bias (fp32, N long, or null): DoRA's column scale and bias, applied in y's epilogue.
inline ForwardPlan forward_plan(const Shapes& s, const void* x, const float* A32, const float* B32, const void* base,
                                float* T, void* y, float scale, const DropoutSpec& dropout, bool use_dropout,
                                int64_t target_blocks, const float* g = nullptr, const float* bias = nullptr) {
  return {gemm_params(as_is(x, s.x_dtype, s.M, s.K), transposed(A32, DType::kFloat32, s.r, s.K), T,
                      DType::kFloat32, dropout_on_a(dropout, use_dropout), target_blocks),
          gemm_params(as_is(T, DType::kFloat32, s.M, s.r), transposed(B32, DType::kFloat32, s.N, s.r), y, s.y_dtype,
                      scaled(scale, base, g, bias), target_blocks)};
}

struct BackwardPlan {
  LowRankGemmParams dT;   // s dy B
  LowRankGemmParams dB;   // s dy^T T
  LowRankGemmParams dAt;  // dropout(x)^T dT: r is the output's columns, the kernel's narrow tile
  LowRankGemmParams dx;   // dropout'(dT A) [+ the base layer's dx, same shape and dtype]
};

inline BackwardPlan backward_plan(const Shapes& s, const void* dy, const void* x, const float* A32, const float* B32,
                                  const float* T32, float* dT, float* dB, float* dAt, void* dx, const void* dx_base,
                                  float scale, const DropoutSpec& dropout, bool use_dropout, int64_t target_blocks) {
  const Operand dy_op = as_is(dy, s.y_dtype, s.M, s.N);
  const Operand dT_op = as_is(dT, DType::kFloat32, s.M, s.r);
  return {gemm_params(dy_op, as_is(B32, DType::kFloat32, s.N, s.r), dT, DType::kFloat32, scaled(scale), target_blocks),
          gemm_params(transposed(dy, s.y_dtype, s.M, s.N), as_is(T32, DType::kFloat32, s.M, s.r), dB, DType::kFloat32,
                      scaled(scale), target_blocks),
          gemm_params(transposed(x, s.x_dtype, s.M, s.K), dT_op, dAt, DType::kFloat32,
                      dropout_on_a(dropout, use_dropout), target_blocks),
          gemm_params(dT_op, as_is(A32, DType::kFloat32, s.r, s.K), dx, s.x_dtype,
                      dropout_on_out(dropout, use_dropout, dx_base), target_blocks)};
}

}  // namespace lora
}  // namespace lora_ext
