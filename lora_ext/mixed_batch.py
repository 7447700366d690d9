"""Many adapters in one batch, PEFT's `adapter_names`: each row of the batch names the adapter it runs
with ("__base__" for the base alone). Inside the context every LoRA layer computes its base output once
for the whole batch and adds each row's adapter update with one operator (lora_ext.multi_lora: the rows
grouped by adapter once per batch, then one shrink and one expand over all adapters, fp32 math, one
rounding). Where autograd would need a gradient (grad mode on and an adapter or input that requires it),
each adapter's rows go through the differentiable LoRA operator instead, so gradients stay right.
modules_to_save run each row through its adapter's copy. As in PEFT, the model must be in eval mode,
and with beam search each name covers its row's beams: a layer's batch may hold any multiple of the names'
rows, in contiguous blocks (an encoder sees the prompts once, a decoder each prompt's beams).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from . import multi_lora, ops

BASE = "__base__"
_current = threading.local()


class MixedBatch:
    """Row groups by adapter, and for each LoRA layer the tensors of each adapter that targets it."""

    def __init__(self, names: list, layer_adapters: dict):
        self.names = list(names)
        self.layer_adapters = layer_adapters  # id(layer) -> {adapter: (A, B, scaling)}
        self.order = sorted({n for n in self.names if n != BASE})  # the operator's adapter indices
        self._groups: dict = {}
        self._plans: dict = {}
        self._lists: dict = {}

    def check_rows(self, rows: int) -> None:
        """A layer's batch has a multiple of len(names) rows (beams, repeated prompts)."""
        if rows % len(self.names):
            raise ValueError(f"adapter_names has {len(self.names)} entries but a layer got a batch of {rows} "
                             f"rows; give one name per row of the batch")

    def groups(self, rows: int) -> dict:
        """adapter -> row indices for a batch of `rows` (a multiple of len(names): beams, repeated prompts)."""
        if rows not in self._groups:
            self.check_rows(rows)
            per = rows // len(self.names)
            groups: dict = {}
            for i, name in enumerate(self.names):
                groups.setdefault(name, []).extend(range(i * per, (i + 1) * per))
            self._groups[rows] = {name: torch.tensor(idx) for name, idx in groups.items()}
        return self._groups[rows]

    def plan(self, x: torch.Tensor) -> multi_lora.MultiLoraPlan:
        """The plan for x's rows (leading dims flattened: a batch row's tokens share its adapter)."""
        key = (x.shape[:-1], x.device)
        if key not in self._plans:
            self.check_rows(x.shape[0])
            index = {n: i for i, n in enumerate(self.order)}
            per_name = x.shape[:-1].numel() // len(self.names)  # each name's rows (beams) times their tokens
            per_row = torch.tensor([index.get(n, -1) for n in self.names]).repeat_interleave(per_name)
            self._plans[key] = multi_lora.plan(per_row, len(self.order), x.device)
        return self._plans[key]

    def adapter_lists(self, layer, x: torch.Tensor, out: torch.Tensor) -> tuple:
        """This layer's (A, B, scale) per adapter of the batch, in self.order; an adapter that does not
        target the layer is rank 0 here."""
        if id(layer) not in self._lists:
            adapters = self.layer_adapters.get(id(layer), {})
            empty_A = x.new_empty((0, x.shape[-1]))
            empty_B = x.new_empty((out.shape[-1], 0))
            A = [adapters[n][0] if n in adapters else empty_A for n in self.order]
            B = [adapters[n][1] if n in adapters else empty_B for n in self.order]
            scales = [adapters[n][2] if n in adapters else 0.0 for n in self.order]
            self._lists[id(layer)] = (A, B, scales)
        return self._lists[id(layer)]

    def lora_forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.merged:
            raise RuntimeError("adapter_names: the active adapter is merged into the base; unmerge it first")
        out = layer.base_layer(x)
        adapters = self.layer_adapters.get(id(layer), {})
        if not adapters:
            return out
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad or any(
                t.requires_grad for A, B, _ in adapters.values() for t in (A, B))):
            return self._differentiable(out, x, adapters)
        A, B, scales = self.adapter_lists(layer, x, out)
        return multi_lora.add_adapters_(out.contiguous(), x, A, B, scales, self.plan(x))

    def _differentiable(self, out: torch.Tensor, x: torch.Tensor, adapters: dict) -> torch.Tensor:
        """Each adapter's rows through the LoRA operator, which autograd differentiates."""
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


def layer_adapters(model, wanted: set) -> dict:
    """For each LoRA layer of a LoraModel, the (A, B, scaling) of each adapter in `wanted` where it lives: the
    active one in the layer, the others beside it."""
    from .lora import lora_scaling  # lora.py asks this module for the running batch

    out = {}
    stored = {name: model._stored[name] for name in wanted if name in model._stored}
    for path, layer in model.lora_layers().items():
        adapters = {}
        if layer.lora_A is not None and model.active_adapter in wanted:
            adapters[model.active_adapter] = (layer.lora_A, layer.lora_B, layer.scaling)
        for name, pairs in stored.items():
            if path in pairs:
                A, B = pairs[path]
                cfg = model.peft_config[name]
                adapters[name] = (A, B, lora_scaling(A.shape[0], cfg.alpha_for(path), cfg.use_rslora))
        out[id(layer)] = adapters
    return out


@contextlib.contextmanager
def adapter_names(model, names, rows: Optional[int] = None):
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
    dora = sorted({n for n in names if n != BASE and model.peft_config[n].use_dora})
    if dora:
        raise ValueError(f"adapter_names: mixed-adapter batches do not take DoRA adapters (PEFT refuses them too), "
                         f"got {dora}; run them one at a time with set_adapter")
    if rows is not None and rows != len(names):
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows; give one per row")
    if current() is not None:
        raise RuntimeError("adapter_names: a mixed-adapter batch is already running in this thread")
    _current.batch = MixedBatch(list(names), layer_adapters(model, set(names)))
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
