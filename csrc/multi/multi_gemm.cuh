// The mixed-batch LoRA kernels on CUDA cores: shrink T = x A_a^T and expand y += s_a T B_a^T, each
// one launch over every tile of every adapter (multi_launch.h). A tile's rows are gathered through
// `rows`, so rows of one adapter need not be adjacent in the batch. Accumulation is fp32; y is read,
// added to and rounded once.
//
// Shrink: 256 threads own 64 tile rows x 16 rank columns (4 x 1 each); K is walked in steps of 16
// through shared memory, and cut into p.splits slices (blockIdx.z) whose partial sums stay in T: the
// expand adds them in slice order as it reads T (deterministic, no atomics). A decode tile of one row
// thus still spreads A's read over many blocks.
// Expand: 256 threads own 64 tile rows x 64 output columns (4 x 4 each); the reduction is over r.
//
// Bounds: a tile whose adapter, range or count is out of range, and a row outside [0, M), is
// skipped, so a malformed plan never reads or writes out of bounds. A row listed twice, or a position
// in two tiles, is a race on y (the CPU operator refuses both; here the result is undefined).
// A tile of more than 64 rows is walked 64 rows at a time by its block.
//
// The host compiler also builds this file in tests/emulation (lora_gemm.cuh says what it maps).
#pragma once

#include <cstdint>

#include "common/cuda_types.cuh"
#include "multi/multi_launch.h"

namespace lora_ext {
namespace multi {
namespace kern {

constexpr int kThreads = 256;
constexpr int kBK = 16;
constexpr int kRows = static_cast<int>(kTileRows);
static_assert(kRows * kBK == 4 * kThreads, "each thread stages 4 elements of the row tile");

struct Tile {
  int64_t start, count;
  AdapterRef adapter;
  bool ok;  // false when the tile is malformed or its adapter does not target this layer (r = 0)
};

__device__ __forceinline__ Tile read_tile(const MultiLoraParams& p, int64_t t) {
  const int32_t* e = p.tiles + 3 * t;
  const int64_t a = e[0], start = e[1], count = e[2];
  Tile tile{start, count, {nullptr, nullptr, 0, 0.0f}, false};
  if (a < 0 || a >= p.n_adapters || start < 0 || count <= 0 || count > p.n_sorted - start) return tile;
  tile.adapter = p.adapters[a];
  tile.ok = tile.adapter.r > 0 && tile.adapter.r <= p.r_max;
  return tile;
}

// The row of x and y at sorted position pos, or -1 when pos is past the tile or the row is out of range.
__device__ __forceinline__ int64_t row_at(const MultiLoraParams& p, const Tile& tile, int64_t i) {
  if (i >= tile.count) return -1;
  const int64_t row = p.rows[tile.start + i];
  return row >= 0 && row < p.M ? row : -1;
}

template <typename TX>
__global__ void __launch_bounds__(kThreads) shrink_kernel(MultiLoraParams p) {
  __shared__ float a_s[kBK][kRows + 4];
  __shared__ float b_s[kBK][16 + 1];
  const Tile tile = read_tile(p, blockIdx.x);
  if (!tile.ok) return;
  const AdapterRef ad = tile.adapter;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * 16;
  if (j0 >= ad.r) return;  // the block is past this adapter's rank (uniform: before any barrier)
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t slice = lora::k_slice_length(p.K, p.splits);
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * slice;
  const int64_t ke = kb + slice < p.K ? kb + slice : p.K;
  const TX* x = static_cast<const TX*>(p.x);
  // Staging: this thread's 4 consecutive k of one tile row, and one element of the 16 x 16 A tile
  // (16 consecutive threads read 16 consecutive k of one row of A).
  const int ii = tid >> 2, kk4 = (tid & 3) * 4, b_k = tid & 15, b_j = tid >> 4;

  for (int64_t i0 = 0; i0 < tile.count; i0 += kRows) {
    const int64_t row = row_at(p, tile, i0 + ii);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t k0 = kb; k0 < ke; k0 += kBK) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t k = k0 + kk4 + c;
        a_s[kk4 + c][ii] = row >= 0 && k < ke ? to_float(x[row * p.K + k]) : 0.0f;
      }
      const int64_t bk = k0 + b_k, bj = j0 + b_j;
      b_s[b_k][b_j] = bk < ke && bj < ad.r ? ad.A[bj * p.K + bk] : 0.0f;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        const float b = b_s[k][tx];
#pragma unroll
        for (int m = 0; m < 4; ++m) acc[m] = fmaf(a_s[k][ty * 4 + m], b, acc[m]);
      }
      __syncthreads();
    }
    const int64_t j = j0 + tx;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t i = i0 + ty * 4 + m;
      if (i < tile.count && j < ad.r) {
        p.T[(static_cast<int64_t>(blockIdx.z) * p.n_sorted + tile.start + i) * p.r_max + j] = acc[m];
      }
    }
  }
}

template <typename TY>
__global__ void __launch_bounds__(kThreads) expand_kernel(MultiLoraParams p) {
  __shared__ float a_s[kBK][kRows + 4];
  __shared__ float b_s[kBK][64 + 4];
  const Tile tile = read_tile(p, blockIdx.x);
  if (!tile.ok) return;
  const AdapterRef ad = tile.adapter;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * 64;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int ii = tid >> 2, kk4 = (tid & 3) * 4;
  const int64_t slab = p.n_sorted * p.r_max;  // one K slice's partial sums
  TY* y = static_cast<TY*>(p.y);

  for (int64_t i0 = 0; i0 < tile.count; i0 += kRows) {
    const bool staged_row = i0 + ii < tile.count;
    const int64_t pos = tile.start + i0 + ii;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < ad.r; k0 += kBK) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = k0 + kk4 + c;
        float t = 0.0f;
        if (staged_row && j < ad.r) {
          for (int z = 0; z < p.splits; ++z) t = add_rn(t, p.T[z * slab + pos * p.r_max + j]);
        }
        a_s[kk4 + c][ii] = t;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int idx = tid + q * kThreads, k = idx & 15, n = idx >> 4;
        const int64_t bj = k0 + k, bn = n0 + n;
        b_s[k][n] = bj < ad.r && bn < p.N ? ad.B[bn * ad.r + bj] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) av[m] = a_s[k][ty * 4 + m];
#pragma unroll
        for (int n = 0; n < 4; ++n) bv[n] = b_s[k][tx * 4 + n];
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
          for (int n = 0; n < 4; ++n) acc[m][n] = fmaf(av[m], bv[n], acc[m][n]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t row = row_at(p, tile, i0 + ty * 4 + m);
      if (row < 0) continue;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const int64_t col = n0 + tx * 4 + n;
        if (col >= p.N) break;
        const int64_t e = row * p.N + col;
        y[e] = from_float<TY>(add_rn(mul_rn(ad.scale, acc[m][n]), to_float(y[e])));
      }
    }
  }
}

__host__ __device__ __forceinline__ unsigned blocks_of(int64_t n, int64_t per) {
  return static_cast<unsigned>((n + per - 1) / per);
}

inline dim3 shrink_grid(const MultiLoraParams& p) {
  return dim3(static_cast<unsigned>(p.n_tiles), blocks_of(p.r_max, 16), static_cast<unsigned>(p.splits));
}

inline dim3 expand_grid(const MultiLoraParams& p) {
  return dim3(static_cast<unsigned>(p.n_tiles), blocks_of(p.N, 64));
}

}  // namespace kern
}  // namespace multi
}  // namespace lora_ext
