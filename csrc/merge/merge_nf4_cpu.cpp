// NF4 merge on the CPU in one pass over the blocks: decode, add the fp64 delta, requantize.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "merge/merge_checks.h"
#include "merge/merge_common.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_cpu_kernels.h"

namespace lora_ext {
namespace merge {
namespace {

using nf4::BlockScales;

std::tuple<at::Tensor, at::Tensor> merge_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                                                 int64_t blocksize, at::IntArrayRef shape, const at::Tensor& A,
                                                 const at::Tensor& B, double scale,
                                                 const c10::optional<at::Tensor>& nested_absmax,
                                                 const c10::optional<at::Tensor>& nested_code,
                                                 const c10::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const auto w = check_merge_nf4_args(packed, absmax, blocksize, shape, A, B, nested_absmax, nested_code, offset,
                                      nested_blocksize);
  const int64_t k = shape[1];
  const at::Tensor A64 = A.to(at::kDouble).contiguous(), B64 = B.to(at::kDouble).contiguous();
  const int64_t r = A.size(0);
  const BlockScales scales = nf4::cpu_block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  at::Tensor packed_out = at::empty({(w.n + 1) / 2, 1}, packed.options());
  at::Tensor absmax_out = at::empty({w.nblocks}, packed.options().dtype(at::kFloat));
  const uint8_t* q = packed.const_data_ptr<uint8_t>();
  const double* a = A64.const_data_ptr<double>();
  const double* bm = B64.const_data_ptr<double>();
  uint8_t* qo = packed_out.data_ptr<uint8_t>();
  float* ao = absmax_out.data_ptr<float>();
  const int64_t n = w.n;
  at::parallel_for(0, w.nblocks, std::max<int64_t>(1, 4096 / blocksize), [&](int64_t b0, int64_t b1) {
    alignas(64) float buf[nf4::kMaxBlocksize];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
      const float s = scales(b);
      for (int64_t e = 0; e < len; ++e) {
        const int64_t f = start + e, i = f / k, c = f % k;
        const uint8_t byte = q[f >> 1];
        const float wv = mul_rn(nf4::code_value((f & 1) ? (byte & 15u) : (byte >> 4)), s);
        double acc = 0.0;
        for (int64_t j = 0; j < r; ++j) acc = add_rn(acc, mul_rn(bm[i * r + j], a[j * k + c]));
        buf[e] = merged_value(static_cast<double>(wv), scale, acc, 1.0);
      }
      nf4::quantize_block_f32(buf, len, start + blocksize > n, ao + b, qo + start / 2);
    }
  });
  return {packed_out, absmax_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_nf4", &merge_nf4_cpu);
}

}  // namespace merge
}  // namespace lora_ext
