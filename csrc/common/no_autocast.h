// Autocast passes our operators through untouched, so it is still on inside their kernels, and an
// ATen op a kernel calls (at::mm, at::addmm) would be recast to 16 bits there: fp32 accumulation
// silently lost. Kernels that call ATen math hold a NoAutocast for its duration.
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace lora_ext {

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace lora_ext
