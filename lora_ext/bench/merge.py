"""Merge W += s * B @ A: ours (in place, W read and written once) against the PyTorch way
W.add_(s * (B @ A)), as time and GB/s (W read + written) and against the roofline of the same run."""
from __future__ import annotations

import torch

from ..nf4 import dtype_name
from ..ops import merge_lora_
from .timing import EFFORT, measure, rotation

CASES = [(4096, 4096, 16), (4096, 4096, 64), (14336, 4096, 16)]
TINY = [(64, 96, 4)]


def run(device: torch.device, ceilings, scale: str) -> dict:
    dtype = torch.bfloat16
    cases = TINY if scale == "tiny" else CASES[:1] if (scale == "quick" and device.type == "cpu") else CASES
    rows = []
    for d, k, r in cases:
        nbytes = 2 * d * k * dtype.itemsize
        sets = rotation(lambda: (torch.randn(d, k, device=device).to(dtype),), nbytes // 2, device)
        A = torch.randn(r, k, device=device) / k**0.5
        B = torch.randn(d, r, device=device) / r**0.5
        peers = {"lora_ext merge_lora_": lambda W: merge_lora_(W, A, B, 0.5),
                 "torch W.add_(s * (B @ A))": lambda W: W.add_((0.5 * (B @ A)).to(dtype))}
        times = {name: measure(fn, sets, device, **EFFORT[scale]).median_s for name, fn in peers.items()}
        base = times["torch W.add_(s * (B @ A))"]
        for name, s in times.items():
            rows.append({"W": f"{d}x{k}", "dtype": dtype_name(dtype), "r": r, "peer": name, "ms": s * 1e3,
                         "GB/s": nbytes / s / 1e9, **ceilings.of(s, nbytes, 2 * d * k * r),
                         "speedup_vs_torch": base / s})
    return {"rows": rows, "notes": []}
