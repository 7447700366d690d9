// C entry points over the real CUDA launchers (csrc/*/*_cuda.cu, built with cuda_emulation.h), for the
// tests/test_*_kernels_emulated.py tests (through ctypes) and tests/emulation/every_launcher.cpp. Each one fills the parameter struct as the
// torch glue (csrc/*/*_cuda_api.cpp) does, from plain pointers and sizes.
#include <cstdint>
#include <vector>

#include "cuda_emulation.h"  // the wmma call counter
#include "dora/dora_launch.h"
#include "lora/lora_launch.h"
#include "lora/lora_plan.h"
#include "merge/merge_launch.h"
#include "multi/multi_launch.h"
#include "nf4/nf4_launch.h"
#include "nf4/nf4_matmul_launch.h"

using namespace lora_ext;

namespace {

// What lora_cuda_api.cpp's tensor_cores_enabled() answers on the emulated GPU (emu_set_tensor_cores).
bool tensor_cores = false;

// One product of a LoRA plan, with the workspaces it needs, as lora_cuda_api.cpp's run() (a K-split
// workspace the caller gives is used as it is: the tests guard it).
bool run(lora::LowRankGemmParams p) {
  std::vector<float> workspace(p.splits > 1 && p.workspace == nullptr ? static_cast<size_t>(p.splits * p.M * p.N)
                                                                       : 0);
  if (!workspace.empty()) p.workspace = workspace.data();
  p.tensor_cores = tensor_cores;
  std::vector<uint16_t> b_parts(static_cast<size_t>(lora::lowrank_b_parts_size(p)));
  p.b_parts = b_parts.empty() ? nullptr : b_parts.data();
  return lora::launch_lowrank_gemm(p, nullptr);
}

// Plain absmax, or the double-quantized form when qabsmax is given (as the glue chooses by nested_absmax).
nf4::ScaleSource scale_source(const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                              const float* nested_code, const float* offset, int nested_log2) {
  return qabsmax != nullptr ? nf4::ScaleSource::nested(qabsmax, nested_absmax, nested_code, offset, nested_log2)
                            : nf4::ScaleSource::plain(absmax);
}

}  // namespace

extern "C" {

void emu_quantize_nf4(const void* x, int dtype, uint8_t* packed, float* absmax, int64_t n, int blocksize_log2) {
  nf4::launch_quantize_nf4({x, packed, absmax, n, blocksize_log2, static_cast<nf4::DType>(dtype)}, nullptr);
}

void emu_double_quant(const float* absmax, const float* offset, const float* code, uint8_t* qabsmax,
                      float* nested_absmax, int64_t n, int blocksize_log2) {
  nf4::launch_double_quant({absmax, offset, code, qabsmax, nested_absmax, n, blocksize_log2}, nullptr);
}

void emu_dequantize_nf4(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                        const float* nested_code, const float* offset, int nested_log2, void* out, int64_t n,
                        int blocksize_log2, int dtype) {
  nf4::DequantizeParams p{};
  p.packed = packed;
  p.scales = scale_source(absmax, qabsmax, nested_absmax, nested_code, offset, nested_log2);
  p.out = out;
  p.n = n;
  p.blocksize_log2 = blocksize_log2;
  p.dtype = static_cast<nf4::DType>(dtype);
  nf4::launch_dequantize_nf4(p, nullptr);
}

void emu_nf4_gemv(const void* x, int64_t ldx, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                  const float* nested_absmax, const float* nested_code, const float* offset, int nested_log2,
                  const void* bias, void* y, int64_t M, int64_t N, int64_t K, int blocksize_log2, int dtype) {
  nf4::GemvParams p{};
  p.x = x;
  p.packed = packed;
  p.scales = scale_source(absmax, qabsmax, nested_absmax, nested_code, offset, nested_log2);
  p.bias = bias;
  p.y = y;
  p.M = M;
  p.N = N;
  p.K = K;
  p.ldx = ldx;
  p.blocksize_log2 = blocksize_log2;
  p.dtype = static_cast<nf4::DType>(dtype);
  nf4::launch_nf4_gemv(p, nullptr);
}

void emu_merge(void* W, const double* A, const double* B, int64_t d, int64_t k, int64_t r, double scale, double sign,
               int dtype) {
  merge::launch_merge({W, A, B, d, k, r, scale, sign, static_cast<merge::DType>(dtype)}, nullptr);
}

void emu_merge_nf4(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                   const float* nested_code, const float* offset, int nested_log2, int blocksize_log2, const double* A,
                   const double* B, int64_t n, int64_t k, int64_t r, double scale, uint8_t* packed_out,
                   float* absmax_out) {
  nf4::MergeNf4Params p{};
  p.packed = packed;
  p.scales = scale_source(absmax, qabsmax, nested_absmax, nested_code, offset, nested_log2);
  p.blocksize_log2 = blocksize_log2;
  p.A = A;
  p.B = B;
  p.n = n;
  p.k = k;
  p.r = r;
  p.scale = scale;
  p.packed_out = packed_out;
  p.absmax_out = absmax_out;
  nf4::launch_merge_nf4(p, nullptr);
}

void emu_dropout(const void* x, void* out, int64_t n, double p, uint64_t seed, int dtype) {
  lora::launch_dropout({x, out, n, lora::dropout_spec(p, seed), static_cast<lora::DType>(dtype)}, nullptr);
}

// One product with the operands, epilogue and K split a test chooses (lora_plan.h's gemm_params,
// then `splits` in place of the plan's choice).
int emu_lowrank_gemm(const void* a, int64_t a_stride_m, int64_t a_stride_k, int a_dtype, const float* b,
                     int64_t b_stride_k, int64_t b_stride_n, const void* addend, void* out, int out_dtype,
                     float* workspace, int64_t M, int64_t N, int64_t K, int splits, float alpha, int dropout_a,
                     int dropout_out, double dropout_p, uint64_t seed) {
  const lora::Operand a_op{a, static_cast<lora::DType>(a_dtype), M, K, a_stride_m, a_stride_k};
  const lora::Operand b_op{b, lora::DType::kFloat32, K, N, b_stride_k, b_stride_n};
  const lora::Epilogue ep{alpha, addend, dropout_a != 0, dropout_out != 0, lora::dropout_spec(dropout_p, seed)};
  lora::LowRankGemmParams p = lora::gemm_params(a_op, b_op, out, static_cast<lora::DType>(out_dtype), ep, 1);
  p.splits = splits;
  p.workspace = workspace;
  return run(p) ? 1 : 0;
}

void emu_set_tensor_cores(int on) { tensor_cores = on != 0; }
uint64_t emu_mma_calls() { return nvcuda::wmma::mma_calls.load(); }

// The LoRA branch's plan (lora_plan.h), launched product by product as lora_cuda_api.cpp does; with g
// and bias (fp32, N long; null for none), DoRA's forward (dora_cuda_api.cpp).
int emu_lora_forward(const void* x, int x_dtype, const float* A32, const float* B32, const void* base, int y_dtype,
                     float* T, void* y, int64_t M, int64_t K, int64_t N, int64_t r, float scale, double dropout_p,
                     uint64_t seed, int64_t target_blocks, const float* g, const float* bias) {
  const lora::Shapes s{M, K, N, r, static_cast<lora::DType>(x_dtype), static_cast<lora::DType>(y_dtype)};
  const auto plan = lora::forward_plan(s, x, A32, B32, base, T, y, scale, lora::dropout_spec(dropout_p, seed),
                                       dropout_p > 0.0, target_blocks, g, bias);
  return run(plan.down) && run(plan.up) ? 1 : 0;
}

// DoRA's column dots (dora_cuda_api.cpp's column_dots_cuda before its sum of the slices): partial is
// splits x N floats, the split count the glue's (column_dot_splits) for target_blocks.
int emu_column_dots(const void* a, const void* b, int dtype, float* partial, int64_t M, int64_t N,
                    int64_t target_blocks) {
  const dora::ColumnDotParams p{a, b, static_cast<dora::DType>(dtype), partial, M, N,
                                dora::column_dot_splits(M, N, target_blocks)};
  return dora::launch_column_dots(p, nullptr) ? 1 : 0;
}

int emu_column_dot_splits(int64_t M, int64_t N, int64_t target_blocks) {
  return dora::column_dot_splits(M, N, target_blocks);
}

int emu_lora_backward(const void* dy, int y_dtype, const void* x, int x_dtype, const float* A32, const float* B32,
                      const float* T32, float* dT, float* dB, float* dAt, void* dx, const void* dx_base, int64_t M,
                      int64_t K, int64_t N, int64_t r, float scale, double dropout_p, uint64_t seed,
                      int64_t target_blocks) {
  const lora::Shapes s{M, K, N, r, static_cast<lora::DType>(x_dtype), static_cast<lora::DType>(y_dtype)};
  const auto plan = lora::backward_plan(s, dy, x, A32, B32, T32, dT, dB, dAt, dx, dx_base, scale,
                                        lora::dropout_spec(dropout_p, seed), dropout_p > 0.0, target_blocks);
  return run(plan.dT) && run(plan.dB) && run(plan.dAt) && run(plan.dx) ? 1 : 0;
}

// multi_lora_cuda_api.cpp's launch: the adapter table from per-adapter fp32 A and B, ranks and scales;
// T (splits x n_sorted x r_max floats) is the caller's, so the tests can guard it.
int emu_multi_lora(const void* x, int x_dtype, void* y, int y_dtype, const int64_t* rows, const int32_t* tiles,
                   const float* const* A32, const float* const* B32, const int64_t* ranks, const float* scales,
                   float* T, int64_t M, int64_t K, int64_t N, int64_t n_sorted, int64_t n_tiles, int64_t n_adapters,
                   int64_t r_max, int splits) {
  std::vector<multi::AdapterRef> table(static_cast<size_t>(n_adapters));
  for (int64_t a = 0; a < n_adapters; ++a) table[a] = {A32[a], B32[a], ranks[a], scales[a]};
  multi::MultiLoraParams p{};
  p.x = x;
  p.x_dtype = static_cast<multi::DType>(x_dtype);
  p.y = y;
  p.y_dtype = static_cast<multi::DType>(y_dtype);
  p.rows = rows;
  p.tiles = tiles;
  p.adapters = table.data();
  p.T = T;
  p.M = M;
  p.K = K;
  p.N = N;
  p.n_sorted = n_sorted;
  p.n_tiles = n_tiles;
  p.n_adapters = n_adapters;
  p.r_max = r_max;
  p.splits = splits;
  return multi::launch_multi_lora(p, nullptr) ? 1 : 0;
}

int emu_multi_shrink_splits(int64_t n_tiles, int64_t r_max, int64_t K, int64_t target_blocks) {
  return multi::multi_shrink_splits(n_tiles, r_max, K, target_blocks);
}

}  // extern "C"
