// Device side of ScaleSource: the per-block absmax reader every NF4 kernel uses.
#pragma once

#include "nf4/nf4_common.h"
#include "nf4/nf4_launch.h"

namespace lora_ext {
namespace nf4 {

__device__ __forceinline__ BlockScales load_scales(const ScaleSource& s) {
  BlockScales b;
  if (s.qabsmax != nullptr) {
    b.qabsmax = s.qabsmax;
    b.nested = s.nested_absmax;
    b.code8 = s.nested_code;
    b.offset = *s.offset;
    b.nested_log2 = s.nested_blocksize_log2;
  } else {
    b.absmax = s.absmax;
  }
  return b;
}

}  // namespace nf4
}  // namespace lora_ext
