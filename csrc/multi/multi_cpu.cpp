// Mixed-batch LoRA on the CPU. Each adapter's rows form one group: a group of many rows (prefill)
// goes through BLAS (multi_composite.h); the small groups (decode) go through the per-row kernel
// below, all of them in two parallel passes: the shrink, one row at a time (T_i = x_i A^T, r dot
// products over K), then the expand, one (group, column block) at a time, which transposes its block
// of B once and adds s T_i B^T to every row of the group as axpys over the block. fp32 accumulation
// (fp64 when any operand is fp64: BLAS), each updated row of y rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/hd.h"
#include "common/no_autocast.h"
#include "multi/multi_checks.h"
#include "multi/multi_composite.h"

namespace lora_ext {
namespace multi {
namespace {

// Groups of at least this many rows take BLAS: below it, a GEMM call costs more than the rows' work.
constexpr int64_t kBlasRows = 16;
constexpr int64_t kColumnBlock = 256;

float dot_portable(const float* a, const float* b, int64_t n) {
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int c = 0; c < 4; ++c) s[c] += a[k + c] * b[k + c];
  for (; k < n; ++k) s[0] += a[k] * b[k];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void axpy_portable(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#if defined(LORA_EXT_X86_SIMD)
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
  const __m256 s = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float out = _mm_cvtss_f32(h);
  for (; k < n; ++k) out += a[k] * b[k];
  return out;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}
#endif

bool use_avx2_fma() {
#if defined(LORA_EXT_X86_SIMD)
  static const bool on = x86_simd_enabled() && __builtin_cpu_supports("fma");
  return on;
#else
  return false;
#endif
}

float dot(const float* a, const float* b, int64_t n) {
#if defined(LORA_EXT_X86_SIMD)
  if (use_avx2_fma()) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
#if defined(LORA_EXT_X86_SIMD)
  if (use_avx2_fma()) return axpy_avx2(alpha, x, y, n);
#endif
  axpy_portable(alpha, x, y, n);
}

// An adapter as the per-row kernel reads it: fp32, A (r x K) and B (N x r) contiguous.
struct Adapter32 {
  at::Tensor A, B;
  int64_t r = 0;
  float scale = 0.0f;
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
      const float* A = ad.A.const_data_ptr<float>();
      float* t = T.data() + (g.t_offset + items[it].second) * r_max;
      for (int64_t j = 0; j < ad.r; ++j) t[j] = dot(xrow.data(), A + j * K, K);
    }
  });

  const int64_t blocks = (N + kColumnBlock - 1) / kColumnBlock;
  const int64_t work = static_cast<int64_t>(groups.size()) * blocks;
  at::parallel_for(0, work, 1, [&](int64_t b, int64_t e) {
    std::vector<float> bt(static_cast<size_t>(r_max * kColumnBlock)), acc(static_cast<size_t>(kColumnBlock));
    for (int64_t w = b; w < e; ++w) {
      const SmallGroup& g = groups[w / blocks];
      const Adapter32& ad = adapters[g.adapter];
      const int64_t n0 = (w % blocks) * kColumnBlock, nb = std::min(kColumnBlock, N - n0);
      const float* B = ad.B.const_data_ptr<float>();
      for (int64_t n = 0; n < nb; ++n)  // B's block, transposed: row j holds B[n0.., j]
        for (int64_t j = 0; j < ad.r; ++j) bt[j * kColumnBlock + n] = B[(n0 + n) * ad.r + j];
      for (int64_t i = 0; i < g.count; ++i) {
        const float* t = T.data() + (g.t_offset + i) * r_max;
        std::fill(acc.begin(), acc.begin() + nb, 0.0f);
        for (int64_t j = 0; j < ad.r; ++j) axpy(t[j], bt.data() + j * kColumnBlock, acc.data(), nb);
        TY* yr = y + rows[g.start + i] * N + n0;
        for (int64_t n = 0; n < nb; ++n) {
          yr[n] = static_cast<TY>(add_rn(mul_rn(ad.scale, acc[n]), static_cast<float>(yr[n])));
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
    if (!ad.A.defined()) {
      ad = {A[g.adapter].to(at::kFloat).contiguous(), B[g.adapter].to(at::kFloat).contiguous(), A[g.adapter].size(0),
            static_cast<float>(scales[g.adapter])};
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
