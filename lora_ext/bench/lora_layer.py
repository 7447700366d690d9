"""One LoRA layer, forward + backward: the frozen base alone, ours (LoRA, QLoRA) and PEFT (dense, and
over bitsandbytes 4-bit), with peak memory on the GPU. The base GEMMs dominate; the LoRA overhead
is what the ratios to 'frozen base' show."""
from __future__ import annotations

import torch
from torch import nn

from . import adapters, machine
from .fwd_bwd import fwd_bwd_step, inputs, layer_rows
from .timing import EFFORT

CASES = {  # (in, out, r, M)
    ("cuda", "full"): [(4096, 4096, 16, 8192), (4096, 4096, 64, 8192), (4096, 14336, 16, 8192),
                       (4096, 14336, 64, 8192)],
    ("cuda", "quick"): [(4096, 4096, 16, 8192), (4096, 14336, 64, 8192)],
    ("cpu", "full"): [(1024, 1024, 16, 512), (1024, 1024, 64, 512)],
    ("cpu", "quick"): [(1024, 1024, 16, 512)],  # the CPU run is a smoke-sized figure
}
TINY = [(64, 96, 4, 16)]


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    dtype = machine.activation_dtype(device)
    for in_f, out_f, r, M in TINY if scale == "tiny" else CASES[device.type, scale]:
        dense = _Holder(nn.Linear(in_f, out_f, bias=False)).to(device=device, dtype=dtype).requires_grad_(False)
        sets = inputs(M, in_f, [out_f], device, dtype)
        res = adapters.run_peers(adapters.builders(dense, ["proj"], r, notes), fwd_bwd_step, sets, device,
                                 EFFORT[scale], notes)
        case = {"layer": f"{in_f}x{out_f}", "dtype": dtype, "r": r, "M": M}
        rows += layer_rows(res, case, ceilings, [(in_f, out_f)])
    return {"rows": rows, "notes": notes}
