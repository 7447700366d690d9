"""PEFT's modules_to_save: whole modules (a classification head, lm_head, embeddings, norms) trained in
full beside the adapters and saved with them. The original stays frozen; each adapter trains its own
copy, and the active adapter's copy runs. Module and state-dict names match PEFT's
ModulesToSaveWrapper (`<path>.original_module.*`, `<path>.modules_to_save.<adapter>.*`)."""
from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from . import mixed_batch


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False  # LoraModel.disable_adapter(): the original runs

    def add_copy(self, adapter_name: str) -> nn.Module:
        trained = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name] = trained
        return trained

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module  # as PEFT: an adapter without a copy of this module sees the original
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        batch = mixed_batch.current()
        if batch is not None and not self.disabled:  # an adapter per row: each row through its own copy
            return batch.saved_forward(self, *args, **kwargs)
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name):
        # Model code reads attributes of the module it thinks it has (lm_head.weight, embed_tokens.padding_idx).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):  # not set yet (copying, unpickling)
                raise
            return getattr(self.active_module, name)


def under(name: str, prefixes, inclusive: bool = False) -> bool:
    """Whether module `name` lies below one of `prefixes` (or is one of them, when inclusive)."""
    return any((inclusive and name == p) or name.startswith(p + ".") for p in prefixes)


def find_saved_modules(model: nn.Module, patterns) -> list:
    """Paths of the modules `modules_to_save` names: PEFT's rule, a module whose path ends with one of the
    strings (so "norm" also matches "input_layernorm"). The same paths before and after wrapping."""
    if not patterns:
        return []
    found = []
    wrappers = []
    for name, module in model.named_modules():
        if not name or under(name, found) or under(name, wrappers):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            wrappers.append(name)
        if any(name.endswith(p) for p in patterns):
            found.append(name)
    return found


def saved_module_shapes(model: nn.Module, paths: list) -> dict:
    """{'<path>.<key>': shape} of what an adapter saves for each module (its state dict)."""
    shapes = {}
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        shapes.update({f"{path}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return shapes
