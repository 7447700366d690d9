"""The `multi` section: many adapters in one batch (PEFT's `adapter_names`), inference. One square layer
and the seven projections of a Llama block, prefill (16 sequences of T tokens) and decode (32 sequences,
one token each), with 1, 4, 16 and 64 distinct adapters (r = 16, rows spread over them in turn):
- lora_ext: `model(x, adapter_names=...)`, the mixed-batch operator in every layer;
- PEFT: the same call on PEFT's model (a Python loop over the adapters present, per layer);
- the floors: the frozen base alone, and lora_ext with one adapter for the whole batch.
lora_part_ms is a peer's time less the frozen base's; lora_part_vs_one_adapter divides it by the
one-adapter batch's: what mixing adapters costs over serving one. lora_floor_ms is the least a mixed
batch's LoRA part can take: the present adapters' A and B read once at the copy bandwidth of the run."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..model import get_peft_model
from ..nf4 import dtype_name
from . import peers
from .decoder_block import DIMS as BLOCK_DIMS, TARGETS as BLOCK_TARGETS, Block
from .lora_layer import _Holder
from .timing import EFFORT, measure, measure_interleaved, rotation

R = 16
COUNTS = {"full": (1, 4, 16, 64), "quick": (1, 16, 64), "tiny": (1, 3)}
SQUARE = {"cuda": 4096, "cpu": 4096, "tiny": 64}
# (sequences, tokens each) per mode: the GPU's are the issue's; the CPU's prefill is shorter (a 4096-token
# prefill of a 4096^2 layer is about a second of fp32 BLAS there per call).
MODES = {
    ("cuda", "full"): {"prefill": (16, 256), "decode": (32, 1)},
    ("cuda", "quick"): {"prefill": (16, 256), "decode": (32, 1)},
    ("cpu", "full"): {"prefill": (16, 64), "decode": (32, 1)},
    ("cpu", "quick"): {"prefill": (16, 16), "decode": (32, 1)},
    ("tiny", "tiny"): {"prefill": (3, 4), "decode": (4, 1)},
}
OURS, PEFT, ONE, BASE = "lora_ext adapter_names", "PEFT adapter_names", "lora_ext one adapter", "frozen base"


def _square(n: int) -> nn.Module:
    return _Holder(nn.Linear(n, n, bias=False))


def _ours(dense: nn.Module, targets: list, n: int) -> nn.Module:
    model = get_peft_model(copy.deepcopy(dense), r=R, lora_alpha=2 * R, target_modules=targets,
                           init_lora_weights=False, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", r=R, lora_alpha=2 * R, init_lora_weights=False)
    return model.eval()


def _peft(peft, dense: nn.Module, targets: list, n: int) -> nn.Module:
    model = peers.peft_lora(peft, copy.deepcopy(dense), targets, R)  # its first adapter is "default"
    for i in range(1, n):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets,
                                                   init_lora_weights=False))
    return model.eval()


def _work(shapes: list, seqs: int, tokens: int, n: int, dtype: torch.dtype) -> tuple:
    """(bytes, FLOPs) of the batch of `tokens` rows: base weights and each present adapter (fp32) read once,
    x and y once."""
    size = dtype.itemsize
    weights = sum(k * m for k, m in shapes) * size
    lora = _lora_bytes(shapes, min(n, seqs))
    acts = tokens * sum(k + m for k, m in shapes) * size
    return weights + lora + acts, 2 * tokens * sum(k * m + R * (k + m) for k, m in shapes)


def _lora_bytes(shapes: list, present: int) -> int:
    """The bytes the LoRA part must read at least: every present adapter's A and B (fp32), once."""
    return present * sum(R * (k + m) for k, m in shapes) * 4


def _case_rows(times: dict, case: dict, ceilings, nbytes: float, flops: float, lora_bytes: int) -> list:
    base, one = times[BASE], times.get(ONE)
    rows = []
    for peer, s in times.items():
        part = s - base if peer != BASE else None
        rows.append({**case, "peer": peer, "ms": s * 1e3, **ceilings.of(s, nbytes, flops),
                     "lora_part_ms": None if part is None else part * 1e3,
                     "lora_floor_ms": None if peer in (BASE, ONE) else lora_bytes / ceilings.copy_Bps * 1e3,
                     "lora_part_vs_one_adapter": part / (one - base) if part is not None and one and one > base
                     else None,
                     "speedup_vs_peft": times[PEFT] / s if PEFT in times else None})
    return rows


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = ("tiny", "tiny") if scale == "tiny" else (device.type, scale)
    square = SQUARE["tiny" if scale == "tiny" else device.type]
    hidden, kv, mlp = BLOCK_DIMS["tiny" if scale == "tiny" else device.type]
    block = Block(hidden, kv, mlp)
    layers = {f"{square}x{square}": (_square(square), ["proj"], [(square, square)]),
              f"llama block {hidden}/{kv}/{mlp}": (block, BLOCK_TARGETS, block.shapes())}
    peft = peers.peft(notes)
    effort = EFFORT[scale]
    torch.manual_seed(0)
    for layer, (dense, targets, shapes) in layers.items():
        dense = dense.to(device=device, dtype=dtype).requires_grad_(False)
        for n in COUNTS[scale]:  # the models once per count, for both modes
            ours = _ours(dense, targets, n).to(device)
            theirs = _peft(peft, dense, targets, n).to(device) if peft is not None else None
            for mode, (seqs, tokens) in MODES[key].items():
                sets = rotation(lambda: (torch.randn(seqs, tokens, shapes[0][0], device=device, dtype=dtype),),
                                seqs * tokens * shapes[0][0] * dtype.itemsize, device)
                names = [f"a{i % n}" for i in range(seqs)]
                fns = {BASE: lambda x: dense(x), ONE: lambda x: ours(x), OURS: lambda x: ours(x, adapter_names=names)}
                if theirs is not None:
                    peft_names = ["default" if name == "a0" else name for name in names]
                    fns[PEFT] = lambda x: theirs(x, adapter_names=peft_names)
                with torch.no_grad():
                    if device.type == "cpu":  # in turns: a slow spell of a shared machine hits all alike
                        times = {k: t.median_s for k, t in measure_interleaved(fns, sets, **effort).items()}
                    else:
                        times = {k: measure(fn, sets, device, **effort).median_s for k, fn in fns.items()}
                case = {"layer": layer, "dtype": dtype_name(dtype), "mode": f"{mode} {seqs}x{tokens}", "adapters": n}
                rows += _case_rows(times, case, ceilings, *_work(shapes, seqs, seqs * tokens, n, dtype),
                                   _lora_bytes(shapes, min(n, seqs)))
            del ours, theirs
    return {"rows": rows, "notes": notes}
