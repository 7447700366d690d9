"""The one-off cost of each adapter initialisation on a square fp32 layer (4096 x 4096 on the GPU and in
a full CPU run), r = 16: PEFT's default (kaiming A, zero B), PiSSA with a full SVD and with a
randomised one (4 subspace iterations), OLoRA (a QR), LoftQ (one round: NF4 quantization and a full
SVD). Operation counts for the roofline are textbook estimates, not measurements: a full SVD of an
n x n matrix ~ 22 n^3, a Householder QR with Q formed ~ 8/3 n^3, a randomised rank-q SVD with N
iterations ~ 4 (N + 1) n^2 q (q = r, as PEFT calls torch.svd_lowrank); each init then forms W - s B A (2 n^2 r). The bytes are A and B written.
The default init's row is what the others are measured against."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..lora import LoraLinear
from . import peers

R = 16
SIZES = {("cuda", "full"): 4096, ("cuda", "quick"): 4096, ("cpu", "full"): 4096, ("cpu", "quick"): 1024}


def _flops(init: str, n: int) -> float:
    if init == "default":
        return 0.0  # random A, zero B: only written (the roofline's bytes)
    return 2 * n * n * R + {"pissa": 22 * n**3, "pissa_niter_4": 4 * 5 * n * n * R, "olora": 8 / 3 * n**3,
                            "loftq": 22 * n**3}[init]


def _time_init(init: str, n: int, device: torch.device) -> float:
    base = nn.Linear(n, n, bias=False, device=device)
    kwargs = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
    value = True if init == "default" else init
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    LoraLinear(base, r=R, lora_alpha=2 * R, init_lora_weights=value, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    n = 64 if scale == "tiny" else SIZES[device.type, scale]
    times = {}
    for init in ("default", "pissa", "pissa_niter_4", "olora", "loftq"):
        _time_init(init, 128, device)  # warm-up: solver handles, first-call costs
        s = peers.attempt(init, lambda: _time_init(init, n, device), notes)
        if s is not None:
            times[init] = s
    for init, s in times.items():
        rows.append({"layer": f"{n}x{n}", "dtype": "float32", "r": R, "peer": init, "ms": s * 1e3,
                     **ceilings.of(s, 4 * 2 * n * R, _flops(init, n)),
                     "speedup_vs_pissa": times["pissa"] / s if "pissa" in times else None})
    return {"rows": rows, "notes": notes}
