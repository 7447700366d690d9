// The CPU composites convert 16-bit operands to fp32 (x, the base output, dy, the base's dx). The copies go
// into a per-thread buffer kept between calls, not a fresh tensor each time: a fresh tensor of a few MiB
// costs mostly first-touch page faults. A bf16 LoRA layer's forward and backward (512 x 1024 x 1024, 2 cores)
// took 12.1 ms with fresh copies and 8.1 ms with kept ones; its base alone takes 5.3 ms. CUDA tensors,
// fp64 and copies larger than kScratchElements are converted into fresh tensors, as before.
#pragma once

#include <ATen/ATen.h>

namespace lora_ext {

constexpr int64_t kScratchElements = int64_t{1} << 22;  // 16 MiB of fp32 a buffer
constexpr int kScratchSlots = 4;  // 0-2: convert's operands of one call; 3: the packed operand of the CPU
constexpr int kPackedSlot = 3;    // LoRA products (lora_gemm_cpu.cpp), live only inside one product

// `numel` fp32 elements of this thread's buffer `slot` (kept and grown between calls), or a fresh tensor
// when more than kScratchElements are asked for. The next use of the slot overwrites it.
inline at::Tensor scratch_buffer(int slot, int64_t numel, const at::TensorOptions& options) {
  if (numel > kScratchElements) return at::empty({numel}, options.dtype(at::kFloat));
  thread_local at::Tensor buffers[kScratchSlots];
  at::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::empty({numel}, options.dtype(at::kFloat));
  return buffer.narrow(0, 0, numel);
}

struct Converted {
  at::Tensor t;          // the operand in the compute dtype
  bool copy = false;     // t is a copy: the caller may overwrite it
  bool scratch = false;  // t is in this thread's buffer: nothing returned may alias it
};

// t in `dtype`: t itself, or a copy (in buffer `slot` when it is a CPU fp32 copy that fits).
inline Converted convert(const at::Tensor& t, at::ScalarType dtype, int slot) {
  if (t.scalar_type() == dtype) return {t, false, false};
  if (!t.device().is_cpu() || dtype != at::kFloat || t.numel() > kScratchElements) return {t.to(dtype), true, false};
  return {scratch_buffer(slot, t.numel(), t.options()).view(t.sizes()).copy_(t), true, true};
}

// A result computed in place in c.t, in `dtype`, as a tensor of its own.
inline at::Tensor take(const Converted& c, at::ScalarType dtype) {
  return c.scratch ? c.t.to(dtype, /*non_blocking=*/false, /*copy=*/true) : c.t.to(dtype);
}

}  // namespace lora_ext
