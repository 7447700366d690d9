// Autocast passes our operators through untouched, so it is still on inside their kernels, and an
// ATen op a kernel calls (at::mm, at::addmm) would be recast to 16 bits there: fp32 accumulation
// silently lost. Kernels that call ATen math hold a NoAutocast for its duration.
#pragma once

#include <ATen/Context.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace lora_ext {

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The adapters' composites (the LoRA and DoRA products in ATen, DoRA's weight norm) promise what their
// CUDA kernels and the CPU compute: fp32 products. cuBLAS would take TF32 for them where the user allowed
// it (torch.backends.cuda.matmul.allow_tf32), so they also hold off TF32. The frozen base's own matmul
// (nf4_linear's) keeps the user's setting, as nn.Linear and bitsandbytes do.
struct ExactProducts {
  NoAutocast no_autocast;
  at::NoTF32Guard no_tf32;
};

}  // namespace lora_ext
