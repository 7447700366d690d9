// Parameters and launcher of the mixed-batch LoRA kernels (plain C++: no torch headers): one batch
// whose rows each name an adapter, every adapter with its own rank and scale.
//
// The rows are visited in an order grouped by adapter (`rows`: sorted position -> row of x and y),
// cut into tiles of at most kTileRows consecutive positions of one adapter. A long run of rows of one
// adapter (prefill) becomes full tiles, the segments of SGMV; a row alone (decode) becomes a tile of
// one row, BGMV's gather. Rows with no adapter are in no tile and keep the base output.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lora/lora_launch.h"  // DType

namespace lora_ext {
namespace multi {

using lora::DType;

constexpr int64_t kTileRows = 64;
// The shrink's K is cut into slices of at least this many, to fill the GPU when there are few tiles.
constexpr int64_t kMinSlice = 256;

// One adapter as the kernels read it: fp32 A (r x K) and B (N x r), contiguous; r = 0 where the
// adapter does not target this layer (its tiles are skipped).
struct AdapterRef {
  const float* A;
  const float* B;
  int64_t r;
  float scale;
};

struct MultiLoraParams {
  const void* x;  // M x K, contiguous
  DType x_dtype;
  void* y;  // M x N, contiguous: y += scale_a * x A_a^T B_a^T on each row of adapter a, rounded once
  DType y_dtype;
  const int64_t* rows;   // n_sorted entries, each a distinct row in [0, M)
  const int32_t* tiles;  // n_tiles x 3: adapter, first sorted position, count (the plan's <= kTileRows)
  const AdapterRef* adapters;
  float* T;  // splits x n_sorted x r_max: the shrink's partial sums, one per K slice
  int64_t M, K, N, n_sorted, n_tiles, n_adapters, r_max;
  int splits;
};

// K slices for the shrink: enough blocks (tiles x rank tiles x slices) for `target_blocks`, slices of
// at least kMinSlice. The host glue and the emulation tests share it.
inline int multi_shrink_splits(int64_t n_tiles, int64_t r_max, int64_t K, int64_t target_blocks) {
  const int64_t blocks = std::max<int64_t>(1, n_tiles * ((r_max + 15) / 16));
  const int64_t most = std::max<int64_t>(1, K / kMinSlice);
  return static_cast<int>(std::clamp<int64_t>((target_blocks + blocks - 1) / blocks, 1, std::min<int64_t>(most, 64)));
}

// Two launches: the shrink (T = x A^T per tile) and the expand (y += scale T B^T per tile). false,
// launching nothing, for a dtype the kernels do not take (fp64 goes through the composite).
bool launch_multi_lora(const MultiLoraParams& p, cudaStream_t stream);

}  // namespace multi
}  // namespace lora_ext
