// Runs CUDA kernel source on the CPU for the tests: every CUDA thread of a block is a std::thread,
// __shared__ arrays become statics (blocks run one at a time), and __syncthreads() is a barrier
// across the block's threads. Slow, and only as faithful as that, but it executes the kernels'
// real index math, tiling, bounds checks and barriers. Include it before the kernel's header.
#pragma once

#include <cuda_runtime.h>

#include <barrier>
#include <functional>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace cuda_emulation {
inline std::barrier<>* block_barrier = nullptr;
}

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

namespace cuda_emulation {

// kernel() once per thread of every block of `grid`, threads of a block concurrently.
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{x, y, z};
            kernel();
          });
        }
        for (auto& th : pool) th.join();
      }
}

}  // namespace cuda_emulation
