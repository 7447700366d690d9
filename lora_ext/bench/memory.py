"""What a model holds, counted tensor by tensor (each storage once): parameters, buffers, gradients,
optimizer state, and bitsandbytes' quant_state (absmax and its nested state are neither parameters
nor buffers); and a step's peak on the CPU, whose allocator keeps no peak (a GPU's does)."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, Optional

import torch
from torch import nn


def _quant_state(qs) -> Iterator[torch.Tensor]:
    for v in vars(qs).values():
        if isinstance(v, torch.Tensor):
            yield v
        elif hasattr(v, "absmax"):  # the nested (double-quant) state
            yield from _quant_state(v)


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, nn.Module):
        for p in obj.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
            if getattr(p, "quant_state", None) is not None:
                yield from _quant_state(p.quant_state)
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def held_MiB(*objs) -> float:
    seen, total = set(), 0
    for obj in objs:
        for t in _tensors(obj):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**20


_MARK = "lora_ext.bench: measured step"


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto writes lines at every profiler start and stop, and c10 a warning for each block allocated
    before it, to file descriptor 2 (not sys.stderr): they would fill the bench's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tree_nodes(roots) -> Iterator:
    stack = list(roots)
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children)


def step_peak_above_start_MiB(step: Callable, args: tuple) -> Optional[float]:
    """The most that one step(*args) adds at once to what was live at its start (what it frees counts: old
    gradients set to None), from the profiler's allocation records: the CPU allocator keeps no peak. Two
    steps run under the profiler and the second is measured, since it cannot see the frees of blocks
    allocated before it started. None where this torch's profiler gives no such records (their event tree is
    not a public API)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*args)
        with record_function(_MARK):
            step(*args)
    try:
        from torch._C._profiler import _EventType

        nodes = list(_tree_nodes(prof.profiler.kineto_results.experimental_event_tree()))
        start, end = next((n.start_time_ns, n.end_time_ns) for n in nodes if n.name == _MARK)
        records = sorted((n.start_time_ns, n.extra_fields.alloc_size) for n in nodes
                         if n.tag == _EventType.Allocation)
    except (AttributeError, ImportError, StopIteration):
        return None
    running = peak = before = sum(nbytes for t, nbytes in records if t < start)
    for t, nbytes in records:
        if start <= t <= end:
            running += nbytes
            peak = max(peak, running)
    return (peak - before) / 2**20
