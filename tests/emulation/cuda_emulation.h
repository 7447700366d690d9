// Runs CUDA kernel source on the CPU for the tests. Every CUDA thread of a block is a std::thread,
// and blocks run one at a time. __shared__ arrays become statics, __syncthreads() is a barrier
// across the block's threads, and __shfl_xor_sync exchanges values through per-warp barriers (our
// kernels shuffle with whole warps only). A thread that returns leaves both barriers, as an exited
// GPU thread does. Slow, and only as faithful as that, but it executes the kernels' and launchers'
// real index math, tiling, bounds checks, barriers and shuffles. Force-included
// (-include) before the CUDA sources, built with -DLORA_EXT_CUDA_EMULATION.
#pragma once

#include <cuda_runtime.h>

#include <math.h>  // fmaf and friends, global as in device code

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
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
