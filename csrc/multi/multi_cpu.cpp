// Mixed-batch LoRA on the CPU. Each adapter's rows form one group: a group of many rows (prefill)
// goes through the one-adapter products (multi_composite.h); the small groups (decode) go through the per-row kernel
// below, all of them in two parallel passes: the shrink, one row at a time (T_i = x_i A^T, r dot
// products over K), then the expand, one (group, column block) at a time: each output y_in is the dot
// of T_i with row n of B (contiguous, r long), eight columns at a time with the eight sums reduced
// together. fp32 accumulation (fp64 when any operand is fp64: BLAS), each updated row of y rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_dot.h"
#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/hd.h"
#include "common/no_autocast.h"
#include "multi/multi_checks.h"
#include "multi/multi_composite.h"

namespace lora_ext {
namespace multi {
namespace {

// Groups of at least this many rows take the one-adapter products: below it, their setup costs more than
// the rows' work.
constexpr int64_t kBlasRows = 16;
constexpr int64_t kColumnBlock = 512;  // of y, per work item of the expand

using cpu_dot::dot;
using cpu_dot::dot8;

// fp32 and contiguous: t itself (no dispatcher call: a decode step passes dozens of adapters per layer),
// or a converted copy kept in `held`.
const float* as_f32(const at::Tensor& t, at::Tensor& held) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.const_data_ptr<float>();
  held = t.to(at::kFloat).contiguous();
  return held.const_data_ptr<float>();
}

// An adapter as the per-row kernel reads it: fp32, A (r x K) and B (N x r) contiguous.
struct Adapter32 {
  const float* A = nullptr;
  const float* B = nullptr;
  int64_t r = 0;
  float scale = 0.0f;
  at::Tensor held_A, held_B;
};

struct SmallGroup {
  int64_t adapter, start, count;  // positions [start, start + count) of rows; T rows at t_offset..
  int64_t t_offset;
};

template <typename TX, typename TY>
void small_groups(const at::Tensor& x2, at::Tensor& y2, const int64_t* rows, const std::vector<SmallGroup>& groups,
                  const std::vector<Adapter32>& adapters, int64_t n_small, int64_t r_max) {
  const int64_t K = x2.size(1), N = y2.size(1);
  const TX* x = x2.const_data_ptr<TX>();
  TY* y = y2.data_ptr<TY>();
  std::vector<float> T(static_cast<size_t>(n_small * r_max));
  // (group, position within it) of each small row, for the shrink's parallel loop.
  std::vector<std::pair<int64_t, int64_t>> items;
  items.reserve(static_cast<size_t>(n_small));
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()); ++g)
    for (int64_t i = 0; i < groups[g].count; ++i) items.emplace_back(g, i);

  const int64_t shrink_grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, r_max * K));
  at::parallel_for(0, n_small, shrink_grain, [&](int64_t b, int64_t e) {
    std::vector<float> xrow(static_cast<size_t>(K));
    for (int64_t it = b; it < e; ++it) {
      const SmallGroup& g = groups[items[it].first];
      const Adapter32& ad = adapters[g.adapter];
      const TX* xr = x + rows[g.start + items[it].second] * K;
      for (int64_t k = 0; k < K; ++k) xrow[k] = static_cast<float>(xr[k]);
      const float* A = ad.A;
      float* t = T.data() + (g.t_offset + items[it].second) * r_max;
      for (int64_t j = 0; j < ad.r; ++j) t[j] = dot(xrow.data(), A + j * K, K);
    }
  });

  const int64_t blocks = (N + kColumnBlock - 1) / kColumnBlock;
  const int64_t work = static_cast<int64_t>(groups.size()) * blocks;
  at::parallel_for(0, work, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const SmallGroup& g = groups[w / blocks];
      const Adapter32& ad = adapters[g.adapter];
      const int64_t n0 = (w % blocks) * kColumnBlock, n1 = std::min(N, n0 + kColumnBlock);
      for (int64_t i = 0; i < g.count; ++i) {  // the block of B stays in cache for the group's rows
        const float* t = T.data() + (g.t_offset + i) * r_max;
        TY* yr = y + rows[g.start + i] * N;
        float acc[8];
        int64_t n = n0;
        for (; n + 8 <= n1; n += 8) {
          dot8(t, ad.B + n * ad.r, ad.r, acc);
          for (int l = 0; l < 8; ++l) {
            yr[n + l] = static_cast<TY>(add_rn(mul_rn(ad.scale, acc[l]), static_cast<float>(yr[n + l])));
          }
        }
        for (; n < n1; ++n) {
          yr[n] = static_cast<TY>(add_rn(mul_rn(ad.scale, dot(t, ad.B + n * ad.r, ad.r)), static_cast<float>(yr[n])));
        }
      }
    }
  });
}

void multi_lora_forward_cpu(const at::Tensor& y, const at::Tensor& x, at::TensorList A, at::TensorList B,
                            at::ArrayRef<double> scales, const at::Tensor& rows, const at::Tensor& tiles) {
  const NoAutocast no_autocast;
  const MultiDims d = check_multi_args(y, x, A, B, scales, rows, tiles);
  check_plan_values(rows, tiles, d);
  if (d.M == 0 || d.N == 0) return;
  bool fp64 = x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble;
  for (size_t i = 0; i < A.size(); ++i) fp64 = fp64 || A[i].scalar_type() == at::kDouble || B[i].scalar_type() == at::kDouble;
  const at::ScalarType cdt = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  at::Tensor y2 = y.view({d.M, d.N});
  const at::Tensor rows_c = rows.contiguous();

  std::vector<SmallGroup> small;
  std::vector<Adapter32> adapters(A.size());
  int64_t n_small = 0;
  for (const Group& g : groups_of(tiles)) {
    if (A[g.adapter].size(0) == 0) continue;  // the adapter does not target this layer
    if (fp64 || g.count >= kBlasRows) {
      add_group_composite(y2, x2, A[g.adapter], B[g.adapter], scales[g.adapter], rows_c.narrow(0, g.start, g.count),
                          cdt);
      continue;
    }
    Adapter32& ad = adapters[g.adapter];
    if (ad.A == nullptr) {
      ad.A = as_f32(A[g.adapter], ad.held_A);
      ad.B = as_f32(B[g.adapter], ad.held_B);
      ad.r = A[g.adapter].size(0);
      ad.scale = static_cast<float>(scales[g.adapter]);
    }
    small.push_back({g.adapter, g.start, g.count, n_small});
    n_small += g.count;
  }
  if (small.empty()) return;
  LORA_DISPATCH_FLOAT_TYPES(x.scalar_type(), "multi_lora_forward_cpu", [&] {
    using TX = scalar_t;
    LORA_DISPATCH_FLOAT_TYPES(y.scalar_type(), "multi_lora_forward_cpu", [&] {
      small_groups<TX, scalar_t>(x2, y2, rows_c.const_data_ptr<int64_t>(), small, adapters, n_small, d.r_max);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("multi_lora_forward_", &multi_lora_forward_cpu); }

}  // namespace multi
}  // namespace lora_ext
