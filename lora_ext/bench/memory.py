"""What a model holds, counted tensor by tensor (each storage once): parameters, buffers, gradients,
optimizer state, and bitsandbytes' quant_state (absmax and its nested state are neither parameters
nor buffers). The one memory figure the CPU gets; on a GPU the allocator's peak is reported too."""
from __future__ import annotations

from typing import Iterator

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
