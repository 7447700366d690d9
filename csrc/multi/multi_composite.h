// One adapter's rows of a mixed batch through the one-adapter operator's products (the CPU kernel of
// lora_gemm_cpu.h, else BLAS): the CPU operator's path for groups of many rows, and both devices' path for
// fp64. The products are fp32 (fp64 if any operand is), and each updated row of y is rounded once, as in
// the kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "lora/lora_composite.h"

namespace lora_ext {
namespace multi {

// y2 (M x N) rows `idx` += scale * x2[idx] A^T B^T, with the products of the one-adapter operator
// (lora_composite.h): a row gets the same bits whether its batch has one adapter or several.
inline void add_group_composite(at::Tensor& y2, const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                                double scale, const at::Tensor& idx, at::ScalarType cdt) {
  const at::Tensor T = lora::product(x2.index_select(0, idx), A.t(), 1.0, cdt);
  const at::Tensor rows = y2.index_select(0, idx);
  at::Tensor yg = lora::up_product_or_undefined(T, B.t(), rows, y2, cdt, scale);
  if (!yg.defined()) yg = lora::add_scaled_product(rows.to(cdt), T, B.to(cdt).t(), scale).to(y2.scalar_type());
  y2.index_copy_(0, idx, yg);
}

// The tiles as runs of consecutive positions of one adapter: (adapter, start, count) on the host.
struct Group {
  int64_t adapter, start, count;
};

inline std::vector<Group> groups_of(const at::Tensor& tiles_cpu) {
  const at::Tensor t = tiles_cpu.contiguous();
  const int32_t* tp = t.const_data_ptr<int32_t>();
  std::vector<Group> out;
  for (int64_t i = 0; i < t.size(0); ++i) {
    const Group g{tp[3 * i], tp[3 * i + 1], tp[3 * i + 2]};
    if (!out.empty() && out.back().adapter == g.adapter && out.back().start + out.back().count == g.start) {
      out.back().count += g.count;
    } else {
      out.push_back(g);
    }
  }
  return out;
}

}  // namespace multi
}  // namespace lora_ext
