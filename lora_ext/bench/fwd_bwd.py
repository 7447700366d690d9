"""A layer's forward + backward as a benchmark step: random output gradients (not .sum(), whose
stride-0 ones take other kernels), gradients cleared each time as a training loop would, the input
needing its gradient (a layer inside a network passes dx on); and the rows that report it."""
from __future__ import annotations

import torch

from ..nf4 import dtype_name
from . import adapters, work
from .timing import rotation


def inputs(M: int, in_f: int, out_dims: list, device: torch.device, dtype: torch.dtype) -> list:
    """Rotated (x, dy_1, ..., dy_n) sets, one dy per output of the module."""
    def make():
        x = torch.randn(M, in_f, device=device, dtype=dtype, requires_grad=True)
        return (x, *(torch.randn(M, n, device=device, dtype=dtype) for n in out_dims))

    nbytes = M * (in_f + sum(out_dims)) * dtype.itemsize
    return rotation(make, nbytes, device)


def fwd_bwd_step(model: torch.nn.Module) -> tuple:
    def step(x, *grads):
        x.grad = None
        model.zero_grad(set_to_none=True)
        out = model(x)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    return step, [model]


def layer_rows(res: dict, case: dict, ceilings, shapes: list) -> list:
    """Rows for adapters.run_peers results over linear layers of these (in, out) shapes; case holds r, M, dtype."""
    times = {k: v["s"] for k, v in res.items()}
    rows = []
    for name, v in res.items():
        r = None if name == "frozen base" else case["r"]
        per_layer = [work.lora_fwd_bwd(case["M"], k, n, r, case["dtype"], name in adapters.FOUR_BIT) for k, n in shapes]
        nbytes, flops = (sum(w[i] for w in per_layer) for i in (0, 1))
        rows.append({**case, "dtype": dtype_name(case["dtype"]), "peer": name, "ms": v["s"] * 1e3,
                     **ceilings.of(v["s"], nbytes, flops), "x_frozen_base": v["s"] / times["frozen base"],
                     "speedup_vs_peft": adapters.speedup_vs_peft(times, name),
                     "peak_MiB": v["peak_MiB"], "held_MiB": v["held_MiB"]})
    return rows
