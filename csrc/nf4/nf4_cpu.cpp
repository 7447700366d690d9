// NF4 quantize / double-quantize / dequantize on the CPU: at::parallel_for over blocks, fp32 math
// from nf4_common.h (the same functions the CUDA kernels call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>

#include "common/dispatch.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_cpu_kernels.h"
#include "nf4/nf4_cpu_simd.h"

namespace lora_ext {
namespace nf4 {
namespace {

constexpr int64_t kGrainElems = 1 << 15;  // elements per parallel task: enough to hide the fork

// The loops below are written for the compiler's auto-vectorizer rather than with at::vec: this
// file is not built with ATen's per-CPU flags, so at::vec::Vectorized would be its scalar-array
// fallback here (measured 2x slower than bitsandbytes on quantize).
template <typename T>
void quantize_block(const T* x, int64_t len, bool partial, float* absmax_out, uint8_t* packed) {
  alignas(64) float buf[kMaxBlocksize + 1];
  alignas(64) uint8_t codes[kMaxBlocksize + 1];
  float am = 0.0f;
  bool has_nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    const float a = std::fabs(v);
    buf[i] = v;
    am = a > am ? a : am;
    has_nan |= (a != a);
  }
  if (has_nan) am = std::numeric_limits<float>::quiet_NaN();  // torch.max propagates NaN
  if (partial) {
    // The trailing block: divided by its clamped absmax, and the clamped value is stored.
    am = clamp_tiny(am);
    for (int64_t i = 0; i < len; ++i) buf[i] = div_rn(buf[i], am);
  } else {
    const float r = div_rn(1.0f, clamp_tiny(am));
    for (int64_t i = 0; i < len; ++i) buf[i] = mul_rn(buf[i], r);
  }
  *absmax_out = am;
  for (int64_t i = 0; i < len; ++i) codes[i] = static_cast<uint8_t>(encode(buf[i]));
  if (len & 1) codes[len] = kPadCode;
  for (int64_t j = 0; j < (len + 1) / 2; ++j) packed[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
}

}  // namespace

void quantize_block_f32(const float* x, int64_t len, bool partial, float* absmax_out, uint8_t* packed) {
  quantize_block(x, len, partial, absmax_out, packed);
}

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& A_in, int64_t blocksize) {
  check_quantize_args(A_in, blocksize);
  const at::Tensor A = A_in.contiguous();
  const int64_t n = A.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, A.options().dtype(at::kFloat));
  LORA_DISPATCH_FLOAT_TYPES(A.scalar_type(), "quantize_nf4_cpu", [&] {
    const scalar_t* x = A.const_data_ptr<scalar_t>();
    uint8_t* q = packed.data_ptr<uint8_t>();
    float* am = absmax.data_ptr<float>();
    at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrainElems / blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        quantize_block(x + start, len, start + blocksize > n, am + b, q + start / 2);
      }
    });
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quant_cpu(const at::Tensor& absmax_in, const at::Tensor& code_in,
                                                                int64_t blocksize) {
  check_double_quant_args(absmax_in, code_in, blocksize);
  const at::Tensor absmax = absmax_in.contiguous().view(-1);
  const int64_t n = absmax.numel();
  // torch's own mean, as bitsandbytes takes it: the offset must round the same way.
  at::Tensor offset = n > 0 ? absmax.mean() : at::zeros({}, absmax.options());
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty({n}, absmax.options().dtype(at::kByte));
  at::Tensor nested = at::empty({nblocks}, absmax.options());
  const float off = offset.item<float>();
  const float* a = absmax.const_data_ptr<float>();
  float mids[kDynCodes - 1];
  dyn_midpoints(code_in.const_data_ptr<float>(), mids);
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* np = nested.data_ptr<float>();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrainElems / blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
      float am = 0.0f;
      for (int64_t i = start; i < end; ++i) am = dyn_absmax_step(am, sub_rn(a[i], off));
      np[b] = am;
      if (am == 0.0f) {
        std::memset(qp + start, 0, end - start);
        continue;
      }
      const float inv = div_rn(1.0f, am);
      for (int64_t i = start; i < end; ++i) qp[i] = static_cast<uint8_t>(dyn_encode(sub_rn(a[i], off), inv, mids));
    }
  });
  return {q, nested, offset};
}

// Per block: the 16 outputs it can hold (code * absmax in fp32, rounded once to T), then each
// packed byte is two table reads. x86 with AVX2 does the reads 16 bytes at a time (nf4_cpu_simd.h).
template <typename T>
void dequantize_blocks(const uint8_t* packed, const BlockScales& scale_of, int64_t blocksize, int64_t n, T* out) {
  const int64_t nblocks = ceil_div(n, blocksize);
  const bool use_simd = x86_simd_enabled();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrainElems / blocksize), [&](int64_t b0, int64_t b1) {
#if defined(LORA_EXT_X86_SIMD)
    if (use_simd) {
      simd::dequantize_range(packed, scale_of, b0, b1, blocksize, n, out);
      return;
    }
#endif
    T table[16];
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = scale_of(b);
      for (uint32_t c = 0; c < 16; ++c) table[c] = static_cast<T>(mul_rn(code_value(c), scale));
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const uint8_t* src = packed + start / 2;
      T* dst = out + start;
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        dst[2 * j] = table[src[j] >> 4];
        dst[2 * j + 1] = table[src[j] & 15];
      }
      if (len & 1) dst[len - 1] = table[src[pairs] >> 4];
    }
  });
}

}  // namespace

void dequantize_into_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, const DequantArgs& args,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         const c10::optional<at::Tensor>& offset, int64_t nested_blocksize, at::Tensor& out) {
  if (args.n == 0) return;
  const BlockScales scales = cpu_block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  LORA_DISPATCH_FLOAT_TYPES(out.scalar_type(), "dequantize_nf4_cpu", [&] {
    dequantize_blocks<scalar_t>(packed.const_data_ptr<uint8_t>(), scales, blocksize, args.n, out.data_ptr<scalar_t>());
  });
}

namespace {

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                              int64_t nested_blocksize) {
  const auto args = check_dequantize_args(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                                          nested_blocksize);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_into_cpu(packed, absmax, blocksize, args, nested_absmax, nested_code, offset, nested_blocksize, out);
  return out;
}

void dequantize_nf4_out_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, at::Tensor& out,
                            const c10::optional<at::Tensor>& nested_absmax,
                            const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                            int64_t nested_blocksize) {
  check_dequantize_out(out, packed);
  const auto args = check_dequantize_args(packed, absmax, blocksize, out.sizes(), out.scalar_type(), nested_absmax,
                                          nested_code, offset, nested_blocksize);
  dequantize_into_cpu(packed, absmax, blocksize, args, nested_absmax, nested_code, offset, nested_blocksize, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4_cpu);
  m.impl("double_quant", &double_quant_cpu);
  m.impl("dequantize_nf4", &dequantize_nf4_cpu);
  m.impl("dequantize_nf4_out", &dequantize_nf4_out_cpu);
}

}  // namespace nf4
}  // namespace lora_ext
