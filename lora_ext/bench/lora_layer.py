"""One LoRA layer, forward + backward: the frozen base alone, ours (LoRA, QLoRA) and PEFT (dense, and
over bitsandbytes 4-bit), with peak memory on the GPU. The base GEMMs dominate; the LoRA overhead
is what the ratios to 'frozen base' show."""
from __future__ import annotations

import torch
from torch import nn

from ..lora import LoraLinear
from ..nf4 import NF4Linear
from .timing import measure

GPU_CASES = [(4096, 4096, 16, 8192), (4096, 4096, 64, 8192), (4096, 14336, 16, 8192), (4096, 14336, 64, 8192)]
CPU_CASES = [(1024, 1024, 16, 512)]  # (in, out, r, M): the CPU run is a smoke-sized figure


def _peft(base: nn.Module, r: int, notes: list):
    try:
        import peft
    except Exception as e:  # noqa: BLE001
        notes.append(f"peft skipped: {type(e).__name__}: {e}")
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(Holder(), cfg)


def _bnb_base(dense: nn.Linear, notes: list):
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        notes.append(f"bitsandbytes skipped: {type(e).__name__}: {e}")
        return None
    l4 = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dense.weight.dtype,
                           compress_statistics=True, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(dense.weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
    return l4.to(dense.weight.device)


def run(device: str = "cpu", quick: bool = True, dtype: torch.dtype | None = None) -> dict:
    device = torch.device(device)
    notes, rows = [], []
    # bf16 on the GPU; fp32 on the CPU, where bf16 matmul without AVX512-BF16 is a slow fallback.
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    if quick and device.type == "cuda":
        cases = cases[::3]
    for in_f, out_f, r, M in cases:
        dense = nn.Linear(in_f, out_f, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(M, in_f, device=device, dtype=dtype, requires_grad=True)
        layers = {"frozen base": dense,
                  "lora_ext LoRA": LoraLinear(dense, r=r, lora_alpha=2 * r, init_lora_weights=False),
                  "lora_ext QLoRA": LoraLinear(NF4Linear.from_linear(dense), r=r, lora_alpha=2 * r,
                                               init_lora_weights=False)}
        peft_dense = _peft(nn.Linear(in_f, out_f, bias=False).to(device=device, dtype=dtype), r, notes)
        if peft_dense is not None:
            layers["PEFT LoRA"] = peft_dense
            l4 = _bnb_base(dense, notes)
            if l4 is not None:
                layers["PEFT QLoRA (bitsandbytes)"] = _peft(l4, r, notes)
        times, peaks = {}, {}
        for name, layer in layers.items():
            def step(layer=layer):
                layer(x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            times[name] = measure(step, [()], device, warmup=2, min_reps=5, min_time_s=0.2).median_s
            if device.type == "cuda":
                peaks[name] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        base = times["frozen base"]
        for name, s in times.items():
            rows.append({"layer": f"{in_f}x{out_f}", "dtype": str(dtype).split(".")[-1], "r": r, "M": M,
                         "impl": name, "ms": s * 1e3,
                         "x_frozen_base": s / base,
                         "speedup_vs_peft": (times.get("PEFT LoRA") / s) if "PEFT LoRA" in times else None,
                         "peak_MiB": peaks.get(name)})
    return {"device": str(device), "copy_bandwidth_GBps": float("nan"), "rows": rows, "notes": notes}
