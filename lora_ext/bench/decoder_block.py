"""The `layers` section: the seven projections of a Llama decoder block, forward + backward, LoRA on all
of them: the frozen base alone, ours (LoRA, QLoRA) and PEFT (dense, over bitsandbytes 4-bit), with
peak memory. GPU shapes are Llama-3-8B's (hidden 4096, MLP 14336, grouped-query attention
with 8 KV heads: k_proj and v_proj are 4096 -> 1024). Attention itself, the norms and the rotary
embedding are left out: the same kernels for every peer, and not what LoRA changes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, machine
from .fwd_bwd import fwd_bwd_step, inputs, layer_rows
from .timing import EFFORT

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DIMS = {"cuda": (4096, 1024, 14336), "cpu": (1024, 256, 3584), "tiny": (64, 16, 224)}  # (hidden, kv, mlp)
CASES = {  # (r, M tokens)
    ("cuda", "full"): [(16, 4096), (64, 4096), (16, 8192)],
    ("cuda", "quick"): [(16, 4096)],
    ("cpu", "full"): [(16, 512), (64, 512)],
    ("cpu", "quick"): [(16, 256)],
}
TINY = [(4, 16)]


class Block(nn.Module):
    def __init__(self, hidden: int, kv: int, mlp: int):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.k_proj, self.v_proj = nn.Linear(hidden, kv, bias=False), nn.Linear(hidden, kv, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(hidden, mlp, bias=False), nn.Linear(hidden, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        h = x + self.o_proj(q)  # q stands in for attention(q, k, v): same shape; k and v get their own dy
        return h + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), k, v

    def shapes(self) -> list:
        return [(m.in_features, m.out_features) for m in (getattr(self, t) for t in TARGETS)]


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    dtype = machine.activation_dtype(device)
    hidden, kv, mlp = DIMS["tiny" if scale == "tiny" else device.type]
    torch.manual_seed(0)
    dense = Block(hidden, kv, mlp).to(device=device, dtype=dtype).requires_grad_(False)
    for r, M in TINY if scale == "tiny" else CASES[device.type, scale]:
        sets = inputs(M, hidden, [hidden, kv, kv], device, dtype)
        res = adapters.run_peers(adapters.builders(dense, TARGETS, r, notes), fwd_bwd_step, sets, device,
                                 EFFORT[scale], notes)
        case = {"block": f"{hidden}/{kv}/{mlp}", "dtype": dtype, "r": r, "M": M}
        rows += layer_rows(res, case, ceilings, dense.shapes())
    notes.append(f"block {hidden}/{kv}/{mlp} = hidden/kv/mlp: q,o {hidden}x{hidden}, k,v {hidden}->{kv} (GQA), "
                 f"gate,up {hidden}->{mlp}, down {mlp}->{hidden}; M = tokens")
    return {"rows": rows, "notes": notes}
