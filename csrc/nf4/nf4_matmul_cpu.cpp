// NF4 linear on the CPU: y = x W^T (+ bias) and dx = dy W, W (N x K) in NF4.
// Small M (decode): a fused kernel decodes each weight row once into a per-thread fp32 buffer and
// dots it with every row of x, or (M >= 5) decodes a block of rows and multiplies it by x^T on the LoRA
// products' kernel; nothing dequantized outlives its row or block. Large M: W is dequantized into a
// per-thread workspace (grown to the largest layer, reused by every call) for torch's GEMM: in the
// activations' 16-bit dtype where the CPU multiplies it natively (bf16: AVX512-BF16; fp16: AVX512-FP16;
// AMX CPUs have these), fp32 accumulation, as the CUDA path and bitsandbytes do; in fp32 otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "common/no_autocast.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_cpu_kernels.h"
#include "nf4/nf4_cpu_simd.h"
#include "lora/lora_gemm_cpu.h"

namespace lora_ext {
namespace nf4 {
namespace {

// Crossovers measured on 2 cores (README, NF4 matmul): the fused GEMV wins to M = 4 against an fp32 GEMM, and
// only at M = 1 against a native 16-bit one.
constexpr int64_t kCpuGemvMaxM = 4;
constexpr int64_t kCpuGemvMaxM16 = 1;
// From this M on, the fused kernel multiplies decoded row blocks on the products' kernel instead of dotting each
// decoded row with every row of x. That kernel takes 16 rows of x at a time whatever M is: the two took the same
// time at M = 4 (1.18 ms for 3584 x 1024 on 2 cores), the row dots 0.81 ms at M = 2 and 1.9 ms at M = 8.
constexpr int64_t kDecodedBlocksMinM = 5;

// Weights [f, f + count) of the flattened NF4 tensor, as fp32 (code * absmax, as the dequantizer).
void decode_run(const uint8_t* packed, int64_t f, int64_t count, const BlockScales& scales, int log2bs, bool simd,
                float* dst) {
  const int64_t f0 = f, end = f + count;
  float table[16];
  while (f < end) {
    const int64_t b = f >> log2bs;
    const int64_t bend = std::min(end, (b + 1) << log2bs);
    const float s = scales(b);
    for (uint32_t c = 0; c < 16; ++c) table[c] = mul_rn(code_value(c), s);
    int64_t i = f;
    if (i & 1) {
      dst[i - f0] = table[packed[i >> 1] & 15];
      ++i;
    }
#if defined(LORA_EXT_X86_SIMD)
    if (simd) i += 2 * simd::expand<float>(packed + (i >> 1), (bend - i) / 2, simd::table_planes<float>(s), dst + (i - f0));
#endif
    for (; i + 1 < bend; i += 2) {
      const uint8_t byte = packed[i >> 1];
      dst[i - f0] = table[byte >> 4];
      dst[i + 1 - f0] = table[byte & 15];
    }
    if (i < bend) dst[i - f0] = table[packed[i >> 1] >> 4];
    f = bend;
  }
}

// Eight independent partial sums, so the compiler vectorizes the dot product without reassociating.
float dot(const float* a, const float* b, int64_t K) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[k + j] * b[k + j];
  float tail = 0.0f;
  for (; k < K; ++k) tail += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// W x^T (N x M fp32), M >= kDecodedBlocksMinM: each task decodes a block of W's rows into its thread's fp32
// buffer (512 KiB, so it stays in L2, or 6 rows where rows are longer; kept for the next call, and nothing
// decoded outlives its block) and multiplies it by x^T with the LoRA products' kernel, whose 6 x 16 register
// blocks use each decoded value for 16 rows of x. The row dots read x from L2 again for every weight row:
// DoRA's A W^T over an NF4 base (M = r = 16, 3584 x 1024) took 3.5 ms with them, 1.2 ms this way.
at::Tensor decoded_blocks_times_x_t(const at::Tensor& x32, const at::Tensor& packed, const BlockScales& scales,
                                    int log2bs, int64_t N) {
  const int64_t K = x32.size(1);
  at::Tensor y_t = at::empty({N, x32.size(0)}, x32.options());
  const int64_t rows = std::min(std::max<int64_t>((int64_t{1} << 17) / K, 6), N);  // K, N > 0 here
  const uint8_t* q = packed.const_data_ptr<uint8_t>();
  const bool simd = x86_simd_enabled();
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    thread_local at::Tensor buffer;
    if (!buffer.defined() || buffer.numel() < rows * K) buffer = at::empty({rows * K}, x32.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * rows, n = std::min(rows, N - i0);
      decode_run(q, i0 * K, n * K, scales, log2bs, simd, buffer.data_ptr<float>());
      at::Tensor out = y_t.narrow(0, i0, n);
      lora::lowrank_gemm_cpu(buffer.narrow(0, 0, n * K).view({n, K}), x32.t(), {}, out, 1.0f);  // runs inline here
    }
  });
  return y_t;
}

// x32: M x K fp32 contiguous; returns M x N fp32.
at::Tensor gemv(const at::Tensor& x32, const at::Tensor& packed, const BlockScales& scales, int log2bs, int64_t N,
                const c10::optional<at::Tensor>& bias) {
  const int64_t M = x32.size(0), K = x32.size(1);
  if (M >= kDecodedBlocksMinM) {
    at::Tensor y = decoded_blocks_times_x_t(x32, packed, scales, log2bs, N).t();
    return (bias.has_value() ? y + bias->to(at::kFloat) : y).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x32.options());
  const float* x = x32.const_data_ptr<float>();
  const uint8_t* q = packed.const_data_ptr<uint8_t>();
  // contiguous: .to() hands back a float32 bias as it is, strides and all, and it is read as an array
  at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool simd = x86_simd_enabled();
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    std::vector<float> w(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      decode_run(q, n * K, K, scales, log2bs, simd, w.data());
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot(x + m * K, w.data(), K) + (bp ? bp[n] : 0.0f);
    }
  });
  return y;
}

// The dtype the large-M product runs in for activations of dtype t: t itself when it is 16-bit and the
// CPU has native GEMM instructions for it, else fp32 (fp64 stays fp64). LORA_EXT_CPU_16BIT_GEMM=0 keeps
// every product in fp32 (read at each call, so tests and benchmarks can compare the two).
at::ScalarType gemm_dtype(at::ScalarType t) {
  if (t == at::kDouble) return at::kDouble;
  const char* env = std::getenv("LORA_EXT_CPU_16BIT_GEMM");
  if (env != nullptr && env[0] == '0') return at::kFloat;
  if ((t == at::kBFloat16 && cpu_has_avx512_bf16()) || (t == at::kHalf && cpu_has_avx512_fp16())) return t;
  return at::kFloat;
}

// The dequantized weight (N x K, `dtype`) in this thread's workspace for that dtype, valid until its next call.
at::Tensor workspace_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                            const DequantArgs& w, int64_t N, int64_t K, at::ScalarType dtype,
                            const c10::optional<at::Tensor>& nested_absmax,
                            const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                            int64_t nested_blocksize) {
  thread_local at::Tensor workspaces[3];  // fp32, bf16, fp16
  at::Tensor& workspace = workspaces[dtype == at::kBFloat16 ? 1 : dtype == at::kHalf ? 2 : 0];
  if (!workspace.defined() || workspace.numel() < N * K) {
    workspace = at::empty({N * K}, dtype == at::kDouble ? at::kFloat : dtype);
  }
  at::Tensor ws = workspace.narrow(0, 0, N * K).view({N, K});
  dequantize_into_cpu(packed, absmax, blocksize, w, nested_absmax, nested_code, offset, nested_blocksize, ws);
  return ws;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          int64_t out_features, int64_t blocksize, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          const c10::optional<at::Tensor>& offset, int64_t nested_blocksize, int64_t gemv_max_m) {
  const NoAutocast no_autocast;
  const auto a = check_linear_args("nf4_linear", x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                   nested_code, offset, nested_blocksize);
  auto out_shape = x.sizes().vec();
  out_shape.back() = a.N;
  // fp32 accumulation for every activation dtype (float64 for float64, the gradcheck case).
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x2d = x.reshape({a.M, a.K});
  const at::ScalarType gdt = gemm_dtype(x.scalar_type());
  const int64_t gemv_max = gemv_max_m >= 0 ? gemv_max_m : gdt == acc ? kCpuGemvMaxM : kCpuGemvMaxM16;
  at::Tensor ya;
  if (a.M == 0 || a.N == 0 || a.K == 0) {
    ya = at::zeros({a.M, a.N}, x.options().dtype(acc));
    if (bias.has_value()) ya.add_(bias->to(acc));
  } else if (acc == at::kFloat && a.M <= gemv_max) {
    ya = gemv(x2d.to(acc).contiguous(), packed,
              cpu_block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize), log2_exact(blocksize),
              a.N, bias);
  } else {
    const at::Tensor w = workspace_weight(packed, absmax, blocksize, a.weight, a.N, a.K, gdt, nested_absmax,
                                          nested_code, offset, nested_blocksize).to(gdt);
    const at::Tensor xg = x2d.to(gdt);
    ya = bias.has_value() ? at::addmm(bias->to(gdt), xg, w.t()) : at::mm(xg, w.t());
  }
  return ya.to(x.scalar_type()).view(out_shape);
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t in_features, int64_t blocksize,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code,
                                     const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const auto a = check_grad_input_args(grad_out, packed, absmax, in_features, blocksize, nested_absmax, nested_code,
                                       offset, nested_blocksize);
  const NoAutocast no_autocast;
  auto out_shape = grad_out.sizes().vec();
  out_shape.back() = a.K;
  if (a.M == 0 || a.N == 0 || a.K == 0) return at::zeros(out_shape, grad_out.options());
  const at::ScalarType gdt = gemm_dtype(grad_out.scalar_type());
  const at::Tensor dy = grad_out.reshape({a.M, a.N}).to(gdt);
  const at::Tensor ws = workspace_weight(packed, absmax, blocksize, a.weight, a.N, a.K, gdt, nested_absmax,
                                         nested_code, offset, nested_blocksize).to(gdt);
  return at::mm(dy, ws).to(grad_out.scalar_type()).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace nf4
}  // namespace lora_ext
