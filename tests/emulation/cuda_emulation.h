// Runs CUDA kernel source on the CPU for the tests. Every CUDA thread of a block is a std::thread,
// and blocks run one at a time. __shared__ arrays become statics, __syncthreads() is a barrier
// across the block's threads, and __shfl_xor_sync exchanges values through per-warp barriers (our
// kernels shuffle with whole warps only). A thread that returns leaves both barriers, as an exited
// GPU thread does. Slow, and only as faithful as that, but it executes the kernels' and launchers'
// real index math, tiling, bounds checks, barriers and shuffles. Force-included
// (-include) before the CUDA sources, built with -DLORA_EXT_CUDA_EMULATION.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>  // fmaf and friends, global as in device code

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

// Device code's built-in integer min/max.
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emulation {

struct Block {
  explicit Block(unsigned threads) : sync(threads), lanes(threads) {
    for (unsigned w = 0; w * 32 < threads; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    }
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> lanes;  // one shuffle slot per thread
};

inline Block* block = nullptr;  // the block running now

// kernel() once per thread of every block of `grid`. A launch makes `threads` std::threads once;
// each walks the blocks in order (x fastest), and a barrier between blocks, whose completion step
// installs the next block's state, keeps one block running at a time.
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = dim3(threads);
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  if (nblocks == 0) return;
  auto state = std::make_unique<Block>(threads);
  block = state.get();
  std::barrier next_block(static_cast<std::ptrdiff_t>(threads), [&]() noexcept {
    state = std::make_unique<Block>(threads);
    block = state.get();
  });
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = uint3{t, 0, 0};
      for (uint64_t b = 0; b < nblocks; ++b) {
        blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                         static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
        Block& mine = *block;
        kernel();
        mine.sync.arrive_and_drop();
        mine.warps[t / 32]->arrive_and_drop();
        next_block.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  block = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block->sync.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int /*width*/ = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  auto& b = *cuda_emulation::block;
  const unsigned t = threadIdx.x, warp = t / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.lanes[t] = bits;
  b.warps[warp]->arrive_and_wait();
  const uint64_t other = b.lanes[warp * 32 + ((t % 32) ^ static_cast<unsigned>(lane_mask))];
  b.warps[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}

// The wmma calls the kernels use, for 16 x 16 x 16 tiles. A real fragment is spread over the warp's
// registers in an unspecified layout; here every thread holds the whole tile, loads and multiplies
// it, and lane 0 alone stores it (the kernels read stored tiles only after a barrier). The loads and
// stores check what the hardware requires: a 256-bit aligned pointer and a leading dimension that
// is a multiple of 16 bytes. mma_sync multiplies in fp32, exact for bf16 inputs, and accumulates in
// order.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float value(float v) { return v; }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float value(__half v) { return __half2float(v); }

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? k : m;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? k : n;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

inline void check_tile_access(const void* p, unsigned ldm, size_t element_size) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * element_size) % 16 != 0) {
    std::fprintf(stderr, "wmma: pointer %p must be 32-byte aligned and ldm %u a multiple of 16 bytes\n", p, ldm);
    std::abort();
  }
}

template <typename Use, int m, int n, int k, typename T, typename Layout>
inline void fill_fragment(fragment<Use, m, n, k, T, Layout>& f, T v) {
  std::fill(std::begin(f.x), std::end(f.x), v);
}

template <typename Use, int m, int n, int k, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, m, n, k, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, m, n, k, T, Layout>;
  check_tile_access(p, ldm, sizeof(T));
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}

inline std::atomic<uint64_t> mma_calls{0};  // tests check that a tensor-core path ran

template <int m, int n, int k, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, m, n, k, float>& d, const fragment<matrix_a, m, n, k, TA, LA>& a,
                     const fragment<matrix_b, m, n, k, TA, LB>& b, const fragment<accumulator, m, n, k, float>& c) {
  ++mma_calls;
  float out[m * n];
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = c.x[i * n + j];
      for (int q = 0; q < k; ++q) s += value(a.x[i * k + q]) * value(b.x[q * n + j]);
      out[i * n + j] = s;
    }
  std::copy(std::begin(out), std::end(out), d.x);
}

template <int m, int n, int k>
inline void store_matrix_sync(float* p, const fragment<accumulator, m, n, k, float>& f, unsigned ldm, layout_t layout) {
  check_tile_access(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * n + c];
}

}  // namespace wmma
}  // namespace nvcuda
