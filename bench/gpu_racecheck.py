"""A tiny LoRA and DoRA forward and backward, and a mixed-adapter batch, for compute-sanitizer's racecheck
(bench/gpu_check.sh): shared memory hazards in the low-rank kernels, tensor-core and CUDA-core, and in the
mixed-batch kernels, on ragged shapes with split-K."""
import os
import sys

import torch

import lora_ext  # noqa: F401  (registers torch.ops.lora_ext)


def main() -> int:
    assert torch.cuda.is_available(), "gpu_racecheck needs a CUDA device"
    torch.manual_seed(0)
    for tensor_cores in ("1", "0"):
        os.environ["LORA_EXT_TENSOR_CORES"] = tensor_cores
        for dtype, (M, K, N, r) in [(torch.bfloat16, (1100, 36, 70, 80)), (torch.float32, (70, 33, 20, 12))]:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            base, dy = torch.randn(M, N, device="cuda", dtype=dtype), torch.randn(M, N, device="cuda", dtype=dtype)
            A, B = torch.randn(r, K, device="cuda") / K ** 0.5, torch.randn(N, r, device="cuda") / r ** 0.5
            y, T = torch.ops.lora_ext.lora_forward(x, base, A, B, 0.5, 0.2, 3)
            torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 0.5, 0.2, 3, torch.randn_like(x))
            g, bias = torch.rand(N, device="cuda"), torch.randn(N, device="cuda")  # DoRA: epilogue, column dots
            y, T = torch.ops.lora_ext.dora_forward(x, base, A, B, g, bias, 0.5)
            torch.ops.lora_ext.dora_backward(dy, x, base, T, A, B, g, 0.5, torch.randn_like(x))
    from lora_ext import multi_lora
    ranks = [5, 0, 33]
    As = [torch.randn(r, 520, device="cuda") for r in ranks]
    Bs = [torch.randn(70, r, device="cuda") for r in ranks]
    idx = torch.tensor([2] * 66 + [0, -1, 1, 0])
    x, y = torch.randn(70, 520, device="cuda"), torch.randn(70, 70, device="cuda")
    multi_lora.add_adapters_(y, x, As, Bs, [0.5, 1.0, 2.0], multi_lora.plan(idx, 3, "cuda"))
    torch.cuda.synchronize()
    print("gpu_racecheck: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
