// Torch-side glue of multi_lora_forward_ on CUDA: the checks that read no device data, the adapter
// table (fp32 copies' pointers, ranks, scales) sent to the device with the launch, and the two kernels
// of multi_gemm.cuh on the current stream. fp64 goes through the cuBLAS composite per adapter group.
// The table is written on the host at each call, so the operator is not for CUDA graph capture.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/no_autocast.h"
#include "lora/lora_dtype.h"
#include "multi/multi_checks.h"
#include "multi/multi_composite.h"
#include "multi/multi_launch.h"

namespace lora_ext {
namespace multi {
namespace {

// The expand's grid covers N in blocks of 64 columns and the shrink's r in blocks of 16, at most 65535
// of each.
constexpr int64_t kMaxFeatures = 65535LL * 64;
constexpr int64_t kMaxRank = 65535LL * 16;

void composite(const at::Tensor& y, const at::Tensor& x, at::TensorList A, at::TensorList B,
               at::ArrayRef<double> scales, const at::Tensor& rows, const at::Tensor& tiles, const MultiDims& d) {
  const NoAutocast no_autocast;
  // fp64 only: the plan is read on the host (a sync), so it is checked as on the CPU before y changes.
  const at::Tensor tiles_cpu = tiles.cpu();
  check_plan_values(rows.cpu(), tiles_cpu, d);
  const at::Tensor x2 = x.reshape({d.M, d.K});
  at::Tensor y2 = y.view({d.M, d.N});
  for (const Group& g : groups_of(tiles_cpu)) {
    if (A[g.adapter].size(0) == 0) continue;
    add_group_composite(y2, x2, A[g.adapter], B[g.adapter], scales[g.adapter], rows.narrow(0, g.start, g.count),
                        at::kDouble);
  }
}

void multi_lora_forward_cuda(const at::Tensor& y, const at::Tensor& x, at::TensorList A, at::TensorList B,
                             at::ArrayRef<double> scales, const at::Tensor& rows, const at::Tensor& tiles) {
  const MultiDims d = check_multi_args(y, x, A, B, scales, rows, tiles);  // first: a CPU x must get its message
  const c10::cuda::CUDAGuard guard(x.device());
  bool fp64 = x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble;
  for (size_t i = 0; i < A.size(); ++i) fp64 = fp64 || A[i].scalar_type() == at::kDouble || B[i].scalar_type() == at::kDouble;
  if (fp64) return composite(y, x, A, B, scales, rows, tiles, d);
  LORA_CHECK(d.N <= kMaxFeatures && d.r_max <= kMaxRank, "multi_lora_forward_: CUDA kernels take at most ",
             kMaxFeatures, " output features and rank ", kMaxRank, ", got ", d.N, " and r = ", d.r_max);
  if (d.M == 0 || d.N == 0 || tiles.size(0) == 0 || d.r_max == 0) return;

  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  std::vector<at::Tensor> held;  // the fp32 copies stay alive until the kernels are queued (the
  held.reserve(2 * A.size());    // caching allocator then keeps them for the stream)
  const at::Tensor table_host =
      at::empty({static_cast<int64_t>(A.size() * sizeof(AdapterRef))}, at::TensorOptions(at::kByte).pinned_memory(true));
  auto* table = reinterpret_cast<AdapterRef*>(table_host.data_ptr());
  for (size_t i = 0; i < A.size(); ++i) {
    held.push_back(A[i].to(at::kFloat).contiguous());
    held.push_back(B[i].to(at::kFloat).contiguous());
    table[i] = {held[2 * i].const_data_ptr<float>(), held[2 * i + 1].const_data_ptr<float>(), A[i].size(0),
                static_cast<float>(scales[i])};
  }
  const at::Tensor table_dev = table_host.to(x.device(), /*non_blocking=*/true);
  const at::Tensor rows_c = rows.contiguous(), tiles_c = tiles.contiguous();
  const int64_t target_blocks = 2LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = multi_shrink_splits(tiles.size(0), d.r_max, d.K, target_blocks);
  at::Tensor T = at::empty({splits, rows.numel(), d.r_max}, x.options().dtype(at::kFloat));

  MultiLoraParams p{};
  p.x = x2.const_data_ptr();
  p.x_dtype = lora::to_dtype(x.scalar_type());
  p.y = y.data_ptr();
  p.y_dtype = lora::to_dtype(y.scalar_type());
  p.rows = rows_c.const_data_ptr<int64_t>();
  p.tiles = tiles_c.const_data_ptr<int32_t>();
  p.adapters = reinterpret_cast<const AdapterRef*>(table_dev.const_data_ptr());
  p.T = T.data_ptr<float>();
  p.M = d.M;
  p.K = d.K;
  p.N = d.N;
  p.n_sorted = rows.numel();
  p.n_tiles = tiles.size(0);
  p.n_adapters = d.n_adapters;
  p.r_max = d.r_max;
  p.splits = splits;
  TORCH_INTERNAL_ASSERT(launch_multi_lora(p, at::cuda::getCurrentCUDAStream()), "multi: no kernel for this dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("multi_lora_forward_", &multi_lora_forward_cuda); }

}  // namespace multi
}  // namespace lora_ext
