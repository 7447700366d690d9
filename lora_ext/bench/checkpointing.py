"""A training step with gradient checkpointing off, on, and "unsloth" (each layer's input offloaded to
pinned CPU memory): step time and peak memory. The model is train_step's Llama
under lora_ext QLoRA; the recomputation costs about one more forward, and offloading should cut the
activation memory by the checkpointed layers' inputs at little more time (the copies overlap)."""
from __future__ import annotations

import copy

import torch

from ..model import get_peft_model
from ..nf4 import dtype_name
from . import adapters, train_step, work
from .timing import EFFORT
from .train_step import R, TARGETS, make_step

MODES = {"off": False, "on": True, "unsloth": "unsloth"}


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    ready = train_step.setup(device, scale, notes)
    if ready is None:
        return {"rows": [], "notes": notes}
    cfg, batch, seq, dtype, dense, sets = ready

    def build(mode):
        return lambda: get_peft_model(copy.deepcopy(dense), r=R, lora_alpha=2 * R, target_modules=TARGETS,
                                      init_lora_weights=False, quantize_base="nf4",
                                      use_gradient_checkpointing=mode).train()

    flops = batch * seq * work.train_flops_per_token(dense, TARGETS, R, seq)  # useful work: recomputation not counted
    res = adapters.run_peers({f"checkpointing {name}": build(mode) for name, mode in MODES.items()}, make_step,
                             sets, device, EFFORT[scale], notes)
    base = res.get("checkpointing off")
    model = f"llama L{cfg['num_hidden_layers']} d{cfg['hidden_size']} QLoRA"
    for name, v in res.items():
        rows.append({"model": model, "dtype": dtype_name(dtype), "tokens": f"{batch}x{seq}", "peer": name,
                     "ms": v["s"] * 1e3, **ceilings.of(v["s"], 0, flops),
                     "speedup_vs_no_checkpointing": base["s"] / v["s"] if base else None, "peak_MiB": v["peak_MiB"]})
    if device.type == "cpu":
        notes.append("on the CPU 'unsloth' is plain checkpointing (nothing to offload to)")
    return {"rows": rows, "notes": notes}
