// NF4 CUDA kernels. The per-element math is nf4_common.h, shared with the CPU kernels.
#include <cstdint>
#include <cstring>

#include "common/cuda_types.cuh"
#include "common/launch.cuh"
#include "nf4/nf4_common.h"
#include "merge/merge_common.h"
#include "nf4/nf4_launch.h"
#include "nf4/nf4_scales.cuh"

#if defined(__USE_FAST_MATH__)
#error "nf4_cuda.cu must not be built with --use_fast_math: bit-exactness needs IEEE division and subnormals"
#endif

namespace lora_ext {
namespace nf4 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kChunk = 32;  // elements one dequant thread writes: 16 packed bytes in
static_assert(kThreads % 32 == 0, "the warp-per-block loops need whole warps");

// Values to quantize, by flat index: an input tensor, or a merged weight computed on the fly.
template <typename T>
struct InputSource {
  const T* x;
  __device__ __forceinline__ float operator()(int64_t f) const { return to_float(x[f]); }
};

// dequant(W)[f] + scale * (B A)[f], the merge of merge_common.h, for an NF4 weight of k columns.
struct MergeSource {
  const uint8_t* packed;
  BlockScales scales;  // offset filled in on the device (load_scales)
  int blocksize_log2;
  const double* A;  // r x k
  const double* B;  // d x r
  int64_t k, r;
  double scale;

  __device__ float operator()(int64_t f) const {
    const float s = scales(f >> blocksize_log2);
    const uint32_t byte = packed[f >> 1];
    const float w = mul_rn(code_value((f & 1) ? (byte & 15u) : (byte >> 4)), s);
    const int64_t i = f / k, c = f % k;
    double acc = 0.0;
    for (int64_t j = 0; j < r; ++j) acc = add_rn(acc, mul_rn(B[i * r + j], A[j * k + c]));
    return merge::merged_value(static_cast<double>(w), scale, acc, 1.0);
  }
};

// One warp per quantization block (blocksize >= 32, so every lane has work in full blocks).
template <typename T>
__device__ __forceinline__ const InputSource<T>& prepare(const InputSource<T>& s, const ScaleSource&) {
  return s;
}

__device__ __forceinline__ MergeSource prepare(MergeSource s, const ScaleSource& scales) {
  s.scales = load_scales(scales);
  return s;
}

template <typename Source>
__global__ void __launch_bounds__(kThreads) quantize_nf4_kernel(Source source, ScaleSource scales, uint8_t* packed,
                                                                float* absmax_out, int64_t n, int blocksize_log2) {
  const auto src = prepare(source, scales);
  const int lane = threadIdx.x & 31;
  const int64_t bs = int64_t{1} << blocksize_log2;
  const int64_t nblocks = (n + bs - 1) >> blocksize_log2;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nblocks; b += nwarps) {
    const int64_t start = b << blocksize_log2;
    const int64_t len = min(bs, n - start);
    const bool partial = start + bs > n;
    float am = 0.0f;
    for (int64_t i = lane; i < len; i += 32) am = absmax_step(am, src(start + i));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) am = absmax_step(am, __shfl_xor_sync(kFullMask, am, off));
    am = canonical_nan(am);
    if (partial) am = clamp_tiny(am);
    if (lane == 0) absmax_out[b] = am;
    const float r = div_rn(1.0f, clamp_tiny(am));
    for (int64_t j = lane; j < (len + 1) / 2; j += 32) {
      const float x0 = src(start + 2 * j);
      const uint32_t c0 = encode(partial ? div_rn(x0, am) : mul_rn(x0, r));
      uint32_t c1 = kPadCode;
      if (2 * j + 1 < len) {
        const float x1 = src(start + 2 * j + 1);
        c1 = encode(partial ? div_rn(x1, am) : mul_rn(x1, r));
      }
      packed[(start >> 1) + j] = static_cast<uint8_t>((c0 << 4) | c1);
    }
  }
}

// One warp per nested block of absmax - offset.
__global__ void __launch_bounds__(kThreads) double_quant_kernel(DoubleQuantParams p) {
  __shared__ float mids_s[kDynCodes - 1];
  for (int k = threadIdx.x; k < kDynCodes - 1; k += blockDim.x) mids_s[k] = mul_rn(0.5f, add_rn(p.code[k], p.code[k + 1]));
  __syncthreads();
  const float off = *p.offset;
  const int lane = threadIdx.x & 31;
  const int64_t bs = int64_t{1} << p.blocksize_log2;
  const int64_t nblocks = (p.n + bs - 1) >> p.blocksize_log2;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < nblocks; b += nwarps) {
    const int64_t start = b << p.blocksize_log2;
    const int64_t end = min(start + bs, p.n);
    float am = 0.0f;
    for (int64_t i = start + lane; i < end; i += 32) am = dyn_absmax_step(am, sub_rn(p.absmax[i], off));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) am = dyn_absmax_step(am, __shfl_xor_sync(kFullMask, am, o));
    if (lane == 0) p.nested_absmax[b] = am;
    const float inv = div_rn(1.0f, am);
    for (int64_t i = start + lane; i < end; i += 32) {
      p.qabsmax[i] = am == 0.0f ? uint8_t{0} : static_cast<uint8_t>(dyn_encode(sub_rn(p.absmax[i], off), inv, mids_s));
    }
  }
}

// Each thread turns 16 packed bytes into 32 outputs, moved as uint4: packed and out are 16-byte
// aligned (the launcher checks). A ragged tail goes element by element.
template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_nf4_kernel(DequantizeParams p) {
  __shared__ float code_s[16];
  if (threadIdx.x < 16) code_s[threadIdx.x] = code_value(threadIdx.x);
  __syncthreads();
  const BlockScales scales = load_scales(p.scales);
  T* out = static_cast<T*>(p.out);
  const int64_t nchunks = (p.n + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks; c += stride) {
    const int64_t start = c * kChunk;
    const int64_t b = start >> p.blocksize_log2;  // a chunk never straddles a block: blocksize >= 32
    const float scale = scales(b);
    if (start + kChunk <= p.n) {
      const uint4 w = *reinterpret_cast<const uint4*>(p.packed + start / 2);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      alignas(16) T vals[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j) {
        const uint32_t byte = (words[j >> 2] >> (8 * (j & 3))) & 0xffu;
        vals[2 * j] = from_float<T>(mul_rn(code_s[byte >> 4], scale));
        vals[2 * j + 1] = from_float<T>(mul_rn(code_s[byte & 15u], scale));
      }
      uint4* dst = reinterpret_cast<uint4*>(out + start);
#pragma unroll
      for (int k = 0; k < static_cast<int>(kChunk * sizeof(T) / 16); ++k) {
        uint4 v;  // memcpy, not a uint4* into vals: that breaks strict aliasing (register moves either way)
        memcpy(&v, reinterpret_cast<const char*>(vals) + 16 * k, 16);
        dst[k] = v;
      }
    } else {
      const int64_t end = min(start + kChunk, p.n);
      for (int64_t i = start; i < end; ++i) {
        const uint32_t byte = p.packed[i >> 1];
        const uint32_t code = (i & 1) ? (byte & 15u) : (byte >> 4);
        out[i] = from_float<T>(mul_rn(code_s[code], scale));
      }
    }
  }
}

// Unaligned views (a packed tensor sliced at an odd offset, a caller's out): one packed byte per
// thread, so a warp still reads 32 consecutive bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_nf4_bytewise_kernel(DequantizeParams p) {
  __shared__ float code_s[16];
  if (threadIdx.x < 16) code_s[threadIdx.x] = code_value(threadIdx.x);
  __syncthreads();
  const BlockScales scales = load_scales(p.scales);
  T* out = static_cast<T*>(p.out);
  const int64_t nbytes = (p.n + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nbytes; j += stride) {
    const int64_t i = 2 * j;
    const int64_t b = i >> p.blocksize_log2;  // i and i + 1 share a block: blocksize is even
    const float scale = scales(b);
    const uint32_t byte = p.packed[j];
    out[i] = from_float<T>(mul_rn(code_s[byte >> 4], scale));
    if (i + 1 < p.n) out[i + 1] = from_float<T>(mul_rn(code_s[byte & 15u], scale));
  }
}

template <typename Source>
void quantize_from(const Source& src, const ScaleSource& scales, uint8_t* packed, float* absmax, int64_t n,
                   int blocksize_log2, cudaStream_t stream) {
  const long long nblocks = (n + (int64_t{1} << blocksize_log2) - 1) >> blocksize_log2;
  launch_kernel(quantize_nf4_kernel<Source>, grid_for(nblocks, kWarpsPerBlock), kThreads, stream, src, scales, packed,
                absmax, n, blocksize_log2);
}

template <typename T>
void quantize_typed(const QuantizeParams& p, cudaStream_t stream) {
  quantize_from(InputSource<T>{static_cast<const T*>(p.x)}, ScaleSource{}, p.packed, p.absmax, p.n, p.blocksize_log2,
                stream);
}

template <typename T>
void dequantize_typed(const DequantizeParams& p, bool vec, cudaStream_t stream) {
  if (vec) {
    launch_kernel(dequantize_nf4_kernel<T>, grid_for((p.n + kChunk - 1) / kChunk, kThreads), kThreads, stream, p);
  } else {
    launch_kernel(dequantize_nf4_bytewise_kernel<T>, grid_for((p.n + 1) / 2, kThreads), kThreads, stream, p);
  }
}

}  // namespace

void launch_quantize_nf4(const QuantizeParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  switch (p.dtype) {
    case DType::kFloat16: quantize_typed<__half>(p, stream); break;
    case DType::kBFloat16: quantize_typed<__nv_bfloat16>(p, stream); break;
    default: quantize_typed<float>(p, stream);
  }
}

void launch_merge_nf4(const MergeNf4Params& p, cudaStream_t stream) {
  if (p.n == 0) return;
  MergeSource src{p.packed, BlockScales{}, p.blocksize_log2, p.A, p.B, p.k, p.r, p.scale};
  quantize_from(src, p.scales, p.packed_out, p.absmax_out, p.n, p.blocksize_log2, stream);
}

void launch_double_quant(const DoubleQuantParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const long long nblocks = (p.n + (int64_t{1} << p.blocksize_log2) - 1) >> p.blocksize_log2;
  launch_kernel(double_quant_kernel, grid_for(nblocks, kWarpsPerBlock), kThreads, stream, p);
}

void launch_dequantize_nf4(const DequantizeParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const bool vec = (reinterpret_cast<uintptr_t>(p.packed) % 16 == 0) && (reinterpret_cast<uintptr_t>(p.out) % 16 == 0);
  switch (p.dtype) {
    case DType::kFloat16: dequantize_typed<__half>(p, vec, stream); break;
    case DType::kBFloat16: dequantize_typed<__nv_bfloat16>(p, vec, stream); break;
    default: dequantize_typed<float>(p, vec, stream);
  }
}

}  // namespace nf4
}  // namespace lora_ext
