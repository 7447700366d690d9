// Merge arithmetic shared by the CPU and CUDA kernels (and mirrored by lora_ext.reference.merge_lora_):
//   acc = sum_j B[i,j] * A[j,k]   in fp64, j in order, each product and sum rounded separately
//   W[i,k] <- T(float(W[i,k] +/- scale * acc))   one rounding into fp32, then to T (as torch's casts)
// so fp32 W gets exactly the fp64 result rounded once, and the CPU and CUDA bits agree.
#pragma once

#include "common/hd.h"

namespace lora_ext {
namespace merge {

// The merged value in fp32 (sign = +1 merge, -1 unmerge); callers convert it to T.
LORA_HD float merged_value(double w, double scale, double acc, double sign) {
  const double v = add_rn(w, mul_rn(sign * scale, acc));
#if defined(__CUDA_ARCH__)
  return __double2float_rn(v);
#else
  return static_cast<float>(v);
#endif
}

}  // namespace merge
}  // namespace lora_ext
