"""LoRA peers over one dense model: ours (LoRA; QLoRA with an NF4 base) and PEFT (dense; over
bitsandbytes Linear4bit), each built on its own copy of the same weights, and run one at a time
(built, timed, its memory read, freed) so that each peer's GPU peak is its own."""
from __future__ import annotations

import copy
import gc
from typing import Callable

import torch
from torch import nn

from ..model import get_peft_model
from . import peers
from .memory import held_MiB, step_peak_above_start_MiB
from .timing import measure, measure_interleaved

FOUR_BIT = {"lora_ext QLoRA", "PEFT QLoRA (bitsandbytes)"}


def builders(dense: nn.Module, targets: list, r: int, notes: list, frozen_base: bool = True) -> dict:
    """name -> a function returning that peer's model (adapters random and non-zero, as after training)."""
    def ours(quantize_base):
        return lambda: get_peft_model(copy.deepcopy(dense), r=r, lora_alpha=2 * r, target_modules=targets,
                                      init_lora_weights=False, quantize_base=quantize_base)

    out = {"frozen base": lambda: copy.deepcopy(dense)} if frozen_base else {}
    out.update({"lora_ext LoRA": ours(None), "lora_ext QLoRA": ours("nf4")})
    peft = peers.peft(notes)
    if peft is not None:
        out["PEFT LoRA"] = lambda: peers.peft_lora(peft, copy.deepcopy(dense), targets, r)
        bnb = peers.bitsandbytes(notes)
        if bnb is not None:
            out["PEFT QLoRA (bitsandbytes)"] = lambda: peers.peft_lora(
                peft, peers.to_bnb_4bit(bnb, copy.deepcopy(dense)), targets, r)
    return out


def speedup_vs_peft(times: dict, name: str):
    """PEFT doing the same job (dense LoRA, or LoRA over 4-bit) over this peer's time."""
    ref = times.get("PEFT QLoRA (bitsandbytes)" if name in FOUR_BIT else "PEFT LoRA")
    return ref / times[name] if ref else None


def run_peers(build: dict, make_step: Callable, arg_sets: list, device: torch.device, effort: dict,
              notes: list) -> dict:
    """name -> {s, peak_MiB, held_MiB}. make_step(model) -> (step(*args), [what to count as held]).
    A PEFT peer that fails here is a note; ours failing is an error. On a GPU each peer is built, timed
    and freed in turn (its peak memory is its own); on the CPU all are built and timed in turns."""
    if device.type == "cpu":
        return _run_peers_interleaved(build, make_step, arg_sets, effort, notes)
    out = {}
    for name, fn in build.items():
        gc.collect()  # the last peer's model gone from the device (cycles too) before this one
        torch.cuda.empty_cache()
        start_mem = torch.cuda.memory_allocated()

        def timed():
            model = fn()
            step, held = make_step(model)
            torch.cuda.reset_peak_memory_stats()  # after the build: its dense transients are not the peer's
            t = measure(step, arg_sets, device, **effort)
            peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
            return {"s": t.median_s, "peak_MiB": peak, "held_MiB": held_MiB(*held)}

        out[name] = peers.attempt(name, timed, notes)
    return {k: v for k, v in out.items() if v is not None}


def _run_peers_interleaved(build: dict, make_step: Callable, arg_sets: list, effort: dict, notes: list) -> dict:
    steps, held = {}, {}
    for name, fn in build.items():
        def built(fn=fn):
            step, to_count = make_step(fn())
            step(*arg_sets[0])  # a PEFT peer that fails only when run is caught here, before the timing
            return step, to_count

        if (peer := peers.attempt(name, built, notes)) is not None:
            steps[name], held[name] = peer
    timings = measure_interleaved(steps, arg_sets, **effort)
    out = {}
    for name, t in timings.items():
        # Counted after the steps ran: an optimizer's state exists only from its first step. The peak: what
        # the peer holds at a step's start (its gradients too) and the most that step adds at once.
        holds = held_MiB(*held[name])
        above = step_peak_above_start_MiB(steps[name], arg_sets[0])
        out[name] = {"s": t.median_s, "peak_MiB": None if above is None else holds + above, "held_MiB": holds}
    return out
