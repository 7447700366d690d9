"""Many adapters in one batch, PEFT's `adapter_names`: each row of the batch names the adapter it runs
with ("__base__" for the base alone). Inside the context every LoRA layer computes its base output once
for the whole batch and adds, for each adapter present, that adapter's low-rank update to its rows (the
LoRA operator over the row subset: fp32 math, one rounding); modules_to_save run each row through its
adapter's copy. As in PEFT, inference only (the model must be in eval mode), and with beam search each
name covers its row's beams.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from . import ops

BASE = "__base__"
_current = threading.local()


class MixedBatch:
    """Row groups by adapter, and for each LoRA layer the tensors of each adapter that targets it."""

    def __init__(self, names: list, layer_adapters: dict):
        self.names = list(names)
        self.layer_adapters = layer_adapters  # id(layer) -> {adapter: (A, B, scaling)}
        self._groups: dict = {}

    def groups(self, rows: int) -> dict:
        """adapter -> row indices for a batch of `rows` (a multiple of len(names): beams, repeated prompts)."""
        if rows not in self._groups:
            if rows % len(self.names):
                raise ValueError(f"adapter_names has {len(self.names)} entries but a layer got a batch of {rows} "
                                 f"rows; give one name per row of the batch")
            per = rows // len(self.names)
            groups: dict = {}
            for i, name in enumerate(self.names):
                groups.setdefault(name, []).extend(range(i * per, (i + 1) * per))
            self._groups[rows] = {name: torch.tensor(idx) for name, idx in groups.items()}
        return self._groups[rows]

    def lora_forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.merged:
            raise RuntimeError("adapter_names: the active adapter is merged into the base; unmerge it first")
        out = layer.base_layer(x)
        adapters = self.layer_adapters.get(id(layer), {})
        for name, rows in self.groups(x.shape[0]).items():
            if name == BASE or name not in adapters:
                continue  # an adapter that does not target this layer leaves its rows to the base
            A, B, scaling = adapters[name]
            rows = rows.to(x.device)
            out[rows] = ops.lora_forward(x[rows], out[rows], A, B, scaling, 0.0, 0)
        return out

    def saved_forward(self, wrapper, *args, **kwargs) -> torch.Tensor:
        """A modules_to_save module: each group's rows through its adapter's copy (or the original)."""
        x = args[0]
        result = None
        for name, rows in self.groups(x.shape[0]).items():
            module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
            part = module(x[rows.to(x.device)], *args[1:], **kwargs)
            if result is None:
                result = part.new_empty((x.shape[0], *part.shape[1:]))
            result[rows.to(x.device)] = part
        return result


def current() -> Optional[MixedBatch]:
    return getattr(_current, "batch", None)


def layer_adapters(model) -> dict:
    """For each LoRA layer of a LoraModel, every adapter's (A, B, scaling) where it lives: the active one
    in the layer, the others beside it."""
    from .lora import lora_scaling  # lora.py asks this module for the running batch

    out = {}
    for path, layer in model.lora_layers().items():
        adapters = {} if layer.lora_A is None else {model.active_adapter: (layer.lora_A, layer.lora_B, layer.scaling)}
        for name, stored in model._stored.items():
            if path in stored:
                A, B = stored[path]
                cfg = model.peft_config[name]
                adapters[name] = (A, B, lora_scaling(A.shape[0], cfg.alpha_for(path), cfg.use_rslora))
        out[id(layer)] = adapters
    return out


@contextlib.contextmanager
def adapter_names(model, names, rows: Optional[int] = None, beams: int = 1):
    """Run `model` (a LoraModel) with one adapter per row. rows: the batch's rows, checked against names."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), one per row, got {names!r}")
    if model.training:
        raise ValueError("adapter_names: mixed-adapter batches are for inference; call model.eval() first (as in "
                         "PEFT, training runs one adapter at a time)")
    unknown = sorted({n for n in names if n != BASE} - set(model.peft_config))
    if unknown:
        raise ValueError(f"adapter_names names adapters this model does not have: {unknown}; adapters: "
                         f"{sorted(model.peft_config)} (and '{BASE}' for the base model alone)")
    if rows is not None and rows != len(names):
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows; give one per row")
    if current() is not None:
        raise RuntimeError("adapter_names: a mixed-adapter batch is already running in this thread")
    _current.batch = MixedBatch([n for n in names for _ in range(beams)], layer_adapters(model))
    try:
        yield
    finally:
        _current.batch = None


def batch_rows(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a Hugging Face model call: input_ids' or inputs_embeds' first dimension."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    return None
