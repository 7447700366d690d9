"""Merge W += s * B @ A: ours (in place, W read and written once) against the PyTorch way
W.add_(s * (B @ A)), as time and GB/s (W read + written) and as a fraction of the copy bandwidth."""
from __future__ import annotations

import torch

from ..ops import merge_lora_
from .timing import copy_bandwidth, measure, rotation

CASES = [(4096, 4096, 16), (4096, 4096, 64), (14336, 4096, 16)]


def run(device: str = "cpu", quick: bool = True, dtype: torch.dtype = torch.bfloat16) -> dict:
    device = torch.device(device)
    copy_bw = copy_bandwidth(device)
    cases = CASES[:1] if (quick and device.type == "cpu") else CASES
    rows = []
    for d, k, r in cases:
        nbytes = 2 * d * k * torch.empty((), dtype=dtype).element_size()

        def make():
            return (torch.randn(d, k, device=device).to(dtype),)
        sets = rotation(make, nbytes // 2, device)
        A = torch.randn(r, k, device=device) / k**0.5
        B = torch.randn(d, r, device=device) / r**0.5
        times = {
            "lora_ext merge_lora_": measure(lambda W: merge_lora_(W, A, B, 0.5), sets, device).median_s,
            "torch W.add_(s * (B @ A))": measure(lambda W: W.add_((0.5 * (B @ A)).to(dtype)), sets, device).median_s,
        }
        base = times["torch W.add_(s * (B @ A))"]
        for name, s in times.items():
            rows.append({"W": f"{d}x{k}", "dtype": str(dtype).split(".")[-1], "r": r, "impl": name, "ms": s * 1e3,
                         "GB/s": nbytes / s / 1e9, "fraction_of_copy_bw": nbytes / s / copy_bw,
                         "speedup_vs_torch": base / s})
    return {"device": str(device), "copy_bandwidth_GBps": copy_bw / 1e9, "rows": rows, "notes": []}
