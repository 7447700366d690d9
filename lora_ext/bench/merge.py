"""Merge W += s * B @ A: ours (in place, W read and written once) against the PyTorch way
W.add_(s * (B @ A)), as time and GB/s (W read + written) and against the roofline of the same run. Our
merge sums B @ A in fp64 (each row rounded once from the fp64 result, the CPU and CUDA bits equal), so
its rows also give the fraction of the roofline drawn with the fp64 matmul rate measured here."""
from __future__ import annotations

import torch

from ..nf4 import dtype_name
from ..ops import merge_lora_
from . import ceilings as ceilings_mod
from .timing import EFFORT, measure, rotation

CASES = [(4096, 4096, 16), (4096, 4096, 64), (14336, 4096, 16)]
TINY = [(64, 96, 4)]


def run(device: torch.device, ceilings, scale: str) -> dict:
    cases = TINY if scale == "tiny" else CASES[:1] if (scale == "quick" and device.type == "cpu") else CASES
    n = ceilings_mod.SIZES["tiny" if scale == "tiny" else device.type][1]
    fp64_flops = ceilings_mod.matmul_rate(device, torch.float64, n)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for d, k, r in cases:
            rows += _case(device, ceilings, fp64_flops, scale, dtype, d, k, r)
    notes = [f"fp64 matmul {fp64_flops / 1e12:.3g} TFLOP/s ({n}x{n}x{n}): fraction_of_fp64_roofline is against "
             "max(bytes / copy bandwidth, 2 d k r / that rate)"]
    return {"rows": rows, "notes": notes}


def _case(device: torch.device, ceilings, fp64_flops: float, scale: str, dtype: torch.dtype, d: int, k: int,
          r: int) -> list:
    nbytes = 2 * d * k * dtype.itemsize
    sets = rotation(lambda: (torch.randn(d, k, device=device).to(dtype),), nbytes // 2, device)
    A = torch.randn(r, k, device=device) / k**0.5
    B = torch.randn(d, r, device=device) / r**0.5
    peers = {"lora_ext merge_lora_": lambda W: merge_lora_(W, A, B, 0.5),
             "torch W.add_(s * (B @ A))": lambda W: W.add_((0.5 * (B @ A)).to(dtype))}
    times = {name: measure(fn, sets, device, **EFFORT[scale]).median_s for name, fn in peers.items()}
    base = times["torch W.add_(s * (B @ A))"]
    fp64_floor = max(nbytes / ceilings.copy_Bps, 2 * d * k * r / fp64_flops)
    return [{"W": f"{d}x{k}", "dtype": dtype_name(dtype), "r": r, "peer": name, "ms": s * 1e3,
             "GB/s": nbytes / s / 1e9, **ceilings.of(s, nbytes, 2 * d * k * r),
             "fraction_of_fp64_roofline": fp64_floor / s, "speedup_vs_torch": base / s}
            for name, s in times.items()]
