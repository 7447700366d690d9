"""get_peft_model and LoraModel: LoRA/QLoRA injected into a Hugging Face model, adapters saved and
loaded in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors, keys
base_model.model.<path>.lora_A.weight), so PEFT and vLLM read ours and we read theirs.

Several named adapters share the base: the active one lives in the LoraLinear layers, the others
are kept as tensors beside them, and set_adapter swaps them in without touching the base. Adapters may
target different modules: a LoRA layer the active adapter does not reach holds none and runs its base.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import re
import warnings
from typing import Optional, Union

import torch
from torch import nn

from . import checkpointing, dora, mixed_batch
from .atomic import atomic_directory, existing, fresh
from .distributed import copy_full_into, full_tensor, rank
from .lora import LoraLinear, _in_out, init_lora_, is_conv1d, lora_scaling
from .nf4 import NF4Linear, check_quantizable
from .peft_config import (BIAS_MODES, DEFAULT_TARGETS, LoraConfig, as_dict, check_patterns,  # noqa: F401
                          is_config_object, kwargs_from_config_object)
from .saved_modules import ModulesToSaveWrapper, find_saved_modules, saved_module_shapes, under

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False), and older PEFT's default
# Keywords of Unsloth's and PEFT's get_peft_model that lora_ext accepts only with these values (they ask
# for nothing); any other unknown keyword, or one of these with another value, is an error that names it.
_NEUTRAL_KEYWORDS = {"qat_scheme": None, "ensure_weight_tying": False}


def _layer_index(name: str, layers_pattern) -> Optional[int]:
    """PEFT's layer index of a module (check_target_module_exists): the first numbered segment (lazy, so an
    expert index further down is not taken), or the number after one of layers_pattern's names."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name) for p in patterns)), None)
    return int(m.group(1)) if m else None


def _in_saved_module(name: str, config: LoraConfig) -> bool:
    """PEFT never puts an adapter on a modules_to_save module or inside one (its _ExcludedModule): the module
    is trained in full instead."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or ())


def _is_target(name: str, config: LoraConfig) -> bool:
    """PEFT's matching: a str is a regex on the full path; a list entry is a full path or a suffix at a dot,
    and only suffix matches are filtered by layers_to_transform ([] filters nothing)."""
    targets, layers = config.target_modules, config.layers_to_transform
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if layers is None or layers == []:
        return True
    index = _layer_index(name, config.layers_pattern)
    return index is not None and index in ([layers] if isinstance(layers, int) else layers)


def _linear_names(model: nn.Module) -> list:
    """Paths of the Linear-like modules a LoRA adapter may target; a LoRA layer counts as the Linear it
    wraps (another adapter of the model may target it too), and nothing inside it counts."""
    out, wrapped = [], []
    for n, m in model.named_modules():
        if under(n, wrapped):
            continue
        if isinstance(m, LoraLinear):
            wrapped.append(n)
        if isinstance(m, (nn.Linear, NF4Linear, LoraLinear)) or is_conv1d(m):
            out.append(n)
    return out


def _head_names(model: nn.Module) -> set:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def _closest(wanted: list, names: list) -> list:
    return sorted({c for w in wanted for c in difflib.get_close_matches(str(w), names, n=5, cutoff=0.4)})


def _matched_modules(model: nn.Module, config: LoraConfig) -> list:
    """(path, module) of every module the config's target_modules names, whatever its type, outside
    modules_to_save; the inside of a LoRA layer or a modules_to_save wrapper is not the model's own."""
    out, internal = [], []
    for name, module in model.named_modules():
        if not name or under(name, internal):
            continue
        if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
            internal.append(name)
        if not _in_saved_module(name, config) and _is_target(name, config):
            out.append((name, module))
    return out


def _why_not(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "LoRA on embeddings (PEFT's lora_embedding_A/B) is not supported by lora_ext"
    if any(isinstance(m, (nn.Linear, NF4Linear)) or is_conv1d(m) for m in module.modules()):
        return "it is not a layer but a block of them: name the Linear layers inside it"
    return "lora_ext adapts Linear, NF4Linear and GPT-2 Conv1D layers only"


def find_targets(model: nn.Module, config: LoraConfig, origin: str = "get_peft_model") -> list:
    """Names of the Linear modules the config targets, before anything changes. As PEFT, modules_to_save and
    what lies inside them are never targets. A target lora_ext cannot adapt (PEFT adapts embeddings and
    convolutions, and refuses blocks) is an error naming it, never skipped; so is matching nothing."""
    linears = _linear_names(model)
    if config.target_modules == "all-linear":  # as PEFT: every Linear/Conv1D but the output head, silently
        heads = _head_names(model)
        names = [n for n in linears if n not in heads and not _in_saved_module(n, config)]
    else:
        matched, adaptable = _matched_modules(model, config), set(linears)
        bad = [(n, m) for n, m in matched if n not in adaptable]
        if bad:
            name, module = bad[0]
            entry = config.target_modules if isinstance(config.target_modules, str) else \
                next(t for t in config.target_modules if name == t or name.endswith("." + t))
            raise ValueError(f"{origin}: target_modules entry {entry!r} matches {name} ({type(module).__name__}): "
                             f"{_why_not(module)}; lora_ext supports Linear, NF4Linear and GPT-2 Conv1D"
                             + (f" (and {len(bad) - 1} more such modules)" if len(bad) > 1 else ""))
        names = [n for n, _ in matched]
    if not names:
        if config.modules_to_save and any(_is_target(n, config) for n in linears):
            raise ValueError(f"{origin}: every module target_modules {config.target_modules!r} matches lies in "
                             f"modules_to_save {config.modules_to_save!r}, which are trained in full and never "
                             f"adapted (as in PEFT): nothing is left to adapt")
        wanted = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        close = _closest(wanted, leaves + linears)
        layers = "" if config.layers_to_transform is None else \
            f" in layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r})"
        raise ValueError(f"{origin}: target_modules {config.target_modules!r} matches no Linear module{layers}; "
                         f"closest Linear names: {close or leaves[:10]}")
    return names


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def get_peft_model(model: nn.Module, r: int = 16, target_modules=DEFAULT_TARGETS, lora_alpha: float = 16,
                   lora_dropout: float = 0.0, bias: str = "none", use_rslora: bool = False, random_state: int = 3407,
                   init_lora_weights: Union[bool, str] = True, layers_to_transform=None, layers_pattern=None,
                   modules_to_save=None, task_type: Optional[str] = None, quantize_base: Optional[str] = None,
                   adapter_name: str = "default",
                   quant_storage: torch.dtype = torch.uint8, use_gradient_checkpointing: Union[bool, str] = False,
                   loftq_config: Optional[dict] = None, max_seq_length: Optional[int] = None,
                   rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                   use_dora: bool = False, **other_keywords) -> "LoraModel":
    """Freeze `model`, put LoRA on the targeted Linear layers (optionally their frozen bases in NF4,
    packed bytes viewed as `quant_storage`).

    The calls users bring from elsewhere work as they are: `r` may be a PEFT `LoraConfig` (or lora_ext's),
    as in `peft.get_peft_model(model, config)`; Unsloth's keywords `use_gradient_checkpointing` (False,
    True, or "unsloth": activations offloaded to CPU, lora_ext/checkpointing.py), `max_seq_length` (the
    longest sequence to train on, kept as `model.max_seq_length`; at most the model's
    max_position_embeddings, as lora_ext does not stretch RoPE) and `loftq_config` (with
    init_lora_weights="loftq"). rank_pattern / alpha_pattern give matching modules their own r and alpha,
    with PEFT's matching rule; layers_to_transform / layers_pattern pick layers by PEFT's rule; task_type
    "SEQ_CLS", "TOKEN_CLS" or "QUESTION_ANS" trains the head in full, as PEFT's task models do. A keyword
    lora_ext does not support is an error naming it, never ignored.
    Everything is checked before the model changes."""
    lora_keywords = dict(target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                         use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                         layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                         modules_to_save=modules_to_save, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                         loftq_config=loftq_config, use_dora=use_dora, task_type=task_type)
    _check_other_keywords(other_keywords)
    if is_config_object(r):
        given = sorted(k for k, v in lora_keywords.items() if not _same_value(v, _lora_defaults()[k]))
        if given:
            raise TypeError(f"get_peft_model: pass either a LoraConfig or LoRA keywords, not both (got a LoraConfig "
                            f"and {given})")
        lora_keywords = kwargs_from_config_object(r, model)
        if isinstance(r, LoraConfig):  # lora_ext's own config also says how the base is stored
            quantize_base = quantize_base or r.quantize_base
            quant_storage = r.quant_storage if quant_storage == torch.uint8 else quant_storage
        r = lora_keywords.pop("r")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("this model already has lora_ext adapters; use LoraModel.add_adapter to add another")
    if lora_keywords["bias"] not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {lora_keywords['bias']!r}")
    if quantize_base not in (None, "nf4"):
        raise ValueError(f"quantize_base must be None or 'nf4', got {quantize_base!r}")
    if not isinstance(lora_keywords["use_dora"], bool):
        raise TypeError(f"use_dora must be True or False, got {lora_keywords['use_dora']!r}")
    checkpointing.check(model, use_gradient_checkpointing)
    _check_max_seq_length(model, max_seq_length)
    targets = lora_keywords["target_modules"]
    lora_keywords.update(target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
                         rank_pattern=dict(lora_keywords["rank_pattern"] or {}),
                         alpha_pattern=dict(lora_keywords["alpha_pattern"] or {}),
                         loftq_config=as_dict(lora_keywords["loftq_config"]))
    config = LoraConfig(r, quantize_base=quantize_base, quant_storage=quant_storage, **lora_keywords)
    _check_init(config, "get_peft_model")
    _inject(model, config, random_state, adapter_name)
    checkpointing.enable(model, use_gradient_checkpointing)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return LoraModel(model, config, adapter_name)


def _lora_defaults() -> dict:
    """get_peft_model's own defaults for the LoRA keywords (what 'not given' means beside a LoraConfig)."""
    params = inspect.signature(get_peft_model).parameters
    return {k: params[k].default for k in ("target_modules", "lora_alpha", "lora_dropout", "bias", "use_rslora",
                                           "init_lora_weights", "layers_to_transform", "layers_pattern",
                                           "modules_to_save", "rank_pattern", "alpha_pattern", "loftq_config",
                                           "use_dora", "task_type")}


def _same_value(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b) or (a in (None, {}) and b in (None, {}))


def _check_other_keywords(keywords: dict) -> None:
    unsupported = [f"{k}={v!r}" for k, v in keywords.items()
                   if k not in _NEUTRAL_KEYWORDS or not _same_value(v, _NEUTRAL_KEYWORDS[k])]
    if unsupported:
        raise TypeError(f"get_peft_model: not supported by lora_ext: {', '.join(sorted(unsupported))}")


def _check_max_seq_length(model: nn.Module, max_seq_length) -> None:
    if max_seq_length is None:
        return
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise ValueError(f"max_seq_length={max_seq_length} exceeds the model's max_position_embeddings={limit}; "
                         f"lora_ext does not extend RoPE as Unsloth does: use a model configured for that length")


def _check_init(config: LoraConfig, origin: str) -> None:
    """The adapter's initialisation and patterns, before anything changes."""
    from .inits import check_init_lora_weights

    config.check(origin)
    if config.loftq_config and config.init_lora_weights != "loftq":
        raise ValueError(f"{origin}: loftq_config is given but init_lora_weights={config.init_lora_weights!r}; "
                         f"LoftQ runs with init_lora_weights='loftq'")
    check_init_lora_weights(config.init_lora_weights, config.loftq_config or None)
    if config.init_lora_weights == "loftq" and config.quantize_base != "nf4":
        raise ValueError(f"{origin}: init_lora_weights='loftq' needs a 4-bit base: quantize_base='nf4' (LoftQ "
                         f"quantizes each target's weight to NF4 and starts the adapter from what that loses)")


def _saved_paths(model: nn.Module, config: LoraConfig, targets: list) -> list:
    """Paths of the modules_to_save modules; an error if none matches or one is (or holds) a LoRA target."""
    paths = find_saved_modules(model, config.modules_to_save)
    if config.modules_to_save and not paths:
        close = _closest(config.modules_to_save, [n for n, _ in model.named_modules() if n])
        raise ValueError(f"modules_to_save {config.modules_to_save!r} matches no module; closest: {close}")
    with_bias = [p for p in paths if any(n.rpartition(".")[2] == "bias" for n, _ in
                                         model.get_submodule(p).named_parameters())] if config.bias == "all" else []
    if with_bias:  # (one without a bias, such as a language model's head, is no conflict)
        raise ValueError(f"bias='all' together with modules_to_save {with_bias}, which have biases, is not supported: "
                         f"a bias inside a module trained in full would be two things at once; use bias='lora_only' "
                         f"or train that module's bias through modules_to_save")
    adapted = [p for p in paths if any(isinstance(m, LoraLinear) for m in model.get_submodule(p).modules())]
    if adapted:  # (another adapter's LoRA layers: a copy of them would be saved under this adapter's name, as PEFT)
        raise ValueError(f"modules_to_save {adapted} are (or contain) LoRA layers of the model's other adapters; "
                         f"a module is either adapted or trained in full, not both (PEFT refuses this too)")
    clash = [p for p in paths if any(under(t, (p,), inclusive=True) for t in targets)]
    if clash:
        raise ValueError(f"modules_to_save {clash} are (or contain) LoRA targets; a module is either adapted "
                         f"or trained in full, not both")
    return paths


def _bias_params(model: nn.Module, mode: str, targets, skip=()) -> dict:
    """The biases an adapter with this `bias` mode trains and saves, by their names after injection (a
    target's own bias is `<target>.base_layer.bias`), so it also works before injection. PEFT's rule:
    'all' = every parameter named `bias`, 'lora_only' = the biases of the LoRA targets."""
    if mode == "none":
        return {}
    targets, out = set(targets), {}
    for name, p in model.named_parameters():
        path, _, leaf = name.rpartition(".")
        if leaf != "bias" or "lora_" in name or under(name, skip):
            continue
        if path in targets:
            path = f"{path}.base_layer"
            name = f"{path}.{leaf}"
        adapted = path.endswith(".base_layer") and path[: -len(".base_layer")] in targets
        if mode == "all" or adapted:
            out[name] = p
    return out


def _add_saved_copies(model: nn.Module, paths: list, adapter_name: str, active_adapter: str) -> None:
    """Give `adapter_name` its own trainable copy of each module in `paths` (wrapping them first) and
    none of any other wrapped module. Only the active adapter's copies train, as in PEFT."""
    for path in paths:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(wrapper)
            wrapper.original_module.requires_grad_(False)
            wrapper.active_adapter = active_adapter
            _set_module(model, path, wrapper)
        if adapter_name not in wrapper.modules_to_save:
            wrapper.add_copy(adapter_name).requires_grad_(adapter_name == active_adapter)
    for path, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper) and path not in paths and adapter_name in module.modules_to_save:
            del module.modules_to_save[adapter_name]


def _check_ranks(model: nn.Module, config: LoraConfig, targets: list) -> None:
    for name in targets:
        r, (in_f, out_f) = config.r_for(name), _in_out(model.get_submodule(name))
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(in_f, out_f):
            raise ValueError(f"{name}: r must be an integer in [1, min(in_features, out_features)] = "
                             f"[1, {min(in_f, out_f)}], got {r!r}")


def _inject(model: nn.Module, config: LoraConfig, random_state: int, adapter_name: str,
            initialize: bool = True, origin: str = "get_peft_model") -> None:
    """initialize=False (an adapter about to be loaded): PiSSA and OLoRA taken again on the base given (the
    original one, as PEFT reads such a file), any other init plain (inits.init_when_loaded). Every check that can fail
    (the config's own, by the caller) comes before the first change to the model."""
    from .inits import init_when_loaded, needs_dense_base

    targets = find_targets(model, config, origin)  # raises before anything changes
    saved = _saved_paths(model, config, targets)
    _check_ranks(model, config, targets)
    config.fan_in_fan_out = any(is_conv1d(model.get_submodule(t)) for t in targets)
    init = config.init_lora_weights if initialize else init_when_loaded(config.init_lora_weights)
    if not initialize and isinstance(init, str) and init.startswith("pissa_niter_"):
        warnings.warn(f"{origin}: init_lora_weights={init!r}: the randomised SVD taken again as the adapter loads "
                      f"gives another residual base than the one it was trained on (PEFT's too); save PiSSA "
                      f"adapters with path_initial_model_for_weight_conversion for an exact reload", UserWarning,
                      stacklevel=3)
    quantized = []
    if config.quantize_base == "nf4":
        heads = _head_names(model)
        left_dense = set(targets) if needs_dense_base(init) else set()  # LoftQ quantizes these itself
        for name in _linear_names(model):
            module = model.get_submodule(name)
            linear = isinstance(module, nn.Linear) or is_conv1d(module)
            if linear and name not in heads and name not in left_dense and not under(name, saved, inclusive=True):
                check_quantizable(name, module.weight, config.quant_storage)  # all of them before the first change
                quantized.append(name)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in quantized:
        _set_module(model, name, NF4Linear.from_linear(model.get_submodule(name), quant_storage=config.quant_storage))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        for name in targets:
            layer = LoraLinear(model.get_submodule(name), config.r_for(name), config.alpha_for(name),
                               config.lora_dropout, config.use_rslora, init,
                               loftq_config=(config.loftq_config or None) if initialize else None,
                               use_dora=config.use_dora)
            base = layer.base_layer
            if isinstance(base, NF4Linear) and base.quant_storage != config.quant_storage:  # LoftQ's new base
                base._set_weight(base.qweight.with_storage(config.quant_storage))
            _set_module(model, name, layer)
    for p in _bias_params(model, config.bias, targets, saved).values():
        p.requires_grad_(True)
    _add_saved_copies(model, saved, adapter_name, adapter_name)


def _plain_state(module: nn.Module, prefix: str, out: dict) -> None:
    if isinstance(module, LoraLinear):
        return _plain_state(module.base_layer, prefix, out)
    if isinstance(module, NF4Linear):
        return _plain_state(module.to_linear(), prefix, out)
    if isinstance(module, ModulesToSaveWrapper):
        return _plain_state(module.original_module, prefix, out)
    for name, p in module._parameters.items():
        if p is not None:
            out[prefix + name] = p.detach()
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = b
    for name, child in module._modules.items():
        if child is not None:
            _plain_state(child, f"{prefix}{name}.", out)


def _applied(t: torch.Tensor, fn) -> torch.Tensor:
    """fn(t) as nn.Module._apply gives it to a parameter: the same Parameter object (an optimizer may hold it)
    with the new data where it can take it."""
    out = fn(t)
    if isinstance(t, nn.Parameter):
        if torch._has_compatible_shallow_copy_type(t, out):
            t.data = out
            return t
        return nn.Parameter(out, requires_grad=t.requires_grad)
    return out


class LoraModel(nn.Module):
    """The wrapped model lives at base_model.model, so state-dict keys match PEFT's."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self._stored: dict = {}  # inactive adapters: name -> {module path: (A, B)}
        self._stored_magnitudes: dict = {}  # inactive DoRA adapters: name -> {module path: magnitude}

    def _apply(self, fn, recurse=True):
        """.to(), .half(), .cuda() ... reach the inactive adapters too, kept beside the layers (in PEFT every
        adapter is registered and moves with the model)."""
        super()._apply(fn, recurse)
        with torch.no_grad():
            self._stored = {name: {path: (_applied(A, fn), _applied(B, fn)) for path, (A, B) in pairs.items()}
                            for name, pairs in self._stored.items()}
            self._stored_magnitudes = {name: {path: _applied(m, fn) for path, m in magnitudes.items()}
                                       for name, magnitudes in self._stored_magnitudes.items()}
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (unpickling, copying): no recursion
                raise
            return getattr(self.base_model.model, name)

    def forward(self, *args, adapter_names: Optional[list] = None, **kwargs):
        """The model's forward; adapter_names=[...] (one per row, "__base__" for none) runs each row with its
        own adapter, as PEFT does (inference only)."""
        if adapter_names is None:
            return self.base_model.model(*args, **kwargs)
        with mixed_batch.adapter_names(self, adapter_names, mixed_batch.batch_rows(args, kwargs)):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list] = None, **kwargs):
        # DoRA's row norms taken once per generate, not once per token: nothing trains inside it.
        if adapter_names is None:
            with dora.dora_caching():
                return self.base_model.model.generate(*args, **kwargs)
        with mixed_batch.adapter_names(self, adapter_names, mixed_batch.batch_rows(args, kwargs)):
            return self.base_model.model.generate(*args, **kwargs)

    def lora_layers(self) -> dict:
        """Every LoRA layer, by path; a layer the active adapter does not target holds none (lora_A is None)."""
        return {n: m for n, m in self.base_model.model.named_modules() if isinstance(m, LoraLinear)}

    def _pairs(self, adapter_name: str) -> dict:
        """{path: (A, B)} of an adapter, where it lives: the active one in its layers, others beside them."""
        if adapter_name == self.active_adapter:
            return {n: (m.lora_A, m.lora_B) for n, m in self.lora_layers().items() if m.lora_A is not None}
        return self._stored[adapter_name]

    def _magnitudes(self, adapter_name: str) -> dict:
        """{path: lora_magnitude_vector} of a DoRA adapter where it lives ({} for a plain LoRA adapter)."""
        if adapter_name == self.active_adapter:
            return {n: m.lora_magnitude_vector for n, m in self.lora_layers().items()
                    if m.lora_A is not None and m.use_dora}
        return self._stored_magnitudes.get(adapter_name, {})

    def get_nb_trainable_parameters(self) -> tuple:
        # Packed NF4 counts its weights, two a byte of storage (as PEFT counts Params4bit).
        packed = {id(m.weight) for m in self.modules() if isinstance(m, NF4Linear)}
        trainable = total = 0
        for p in self.parameters():
            n = p.numel() * (2 * p.element_size() if id(p) in packed else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def saved_modules(self) -> dict:
        """The modules_to_save wrappers, by path."""
        return {n: m for n, m in self.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    # ---------------------------------------------------------------- save / load (PEFT format)
    def _adapter_state(self, adapter_name: str) -> dict:
        """What an adapter saves, by model path: lora_A/lora_B, its biases (bias != 'none'; biases are
        shared by every adapter, as in PEFT), its copies of the modules_to_save."""
        pairs = self._pairs(adapter_name)
        state = {}
        for path, (A, B) in pairs.items():
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = A, B
        config, model = self.peft_config[adapter_name], self.base_model.model
        state.update({f"{path}.lora_magnitude_vector": m for path, m in self._magnitudes(adapter_name).items()})
        state.update(_bias_params(model, config.bias, list(pairs), self.saved_modules()))
        for path, wrapper in self.saved_modules().items():
            if adapter_name in wrapper.modules_to_save:
                state.update({f"{path}.{k}": v for k, v in wrapper.modules_to_save[adapter_name].state_dict().items()})
        return state

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list] = None,
                        is_main_process: Optional[bool] = None,
                        path_initial_model_for_weight_conversion: Optional[str] = None) -> None:
        """PEFT's layout: the 'default' adapter in save_directory, any other in save_directory/<name>.
        Distributed: every rank must call it (gathering FSDP2-sharded adapter tensors is a collective, so
        calling it on rank 0 alone hangs); only the adapters are gathered, and the main process (rank 0
        unless told) writes. path_initial_model_for_weight_conversion: the directory where a PiSSA/OLoRA
        adapter was saved right after get_peft_model; the adapter is then written as a plain LoRA adapter
        (rank 2r) over the ORIGINAL base weights, as PEFT does (lora_ext.inits.to_plain_lora)."""
        from safetensors.torch import save_file

        from .inits import to_plain_lora

        if is_main_process is None:
            is_main_process = rank() == 0
        initial = self._read_adapter(path_initial_model_for_weight_conversion)[1] \
            if path_initial_model_for_weight_conversion else None
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise KeyError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        files = {}  # path under save_directory -> (tensors, config)
        for name in names:
            full = {k: full_tensor(v) for k, v in self._adapter_state(name).items()}  # a collective: every rank
            cfg = self.peft_config[name].to_peft(getattr(getattr(self.base_model.model, "config", None),
                                                         "name_or_path", None) or None, self._auto_mapping(name))
            if initial is not None:
                full, cfg = to_plain_lora({k: v.detach().cpu() for k, v in full.items()}, initial, cfg)
            files["" if name == "default" else name] = (
                {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in full.items()}, cfg)
        if not is_main_process:
            return
        # Switched in whole: a reader (or a save killed half way) sees the previous adapters or these.
        with atomic_directory(save_directory) as new:
            for sub, (sd, cfg) in files.items():
                directory = os.path.join(new, sub)
                os.makedirs(directory, exist_ok=True)
                save_file(sd, fresh(os.path.join(directory, WEIGHTS_NAME)), metadata={"format": "pt"})
                with open(fresh(os.path.join(directory, CONFIG_NAME)), "w") as f:
                    json.dump(cfg, f, indent=2)

    def _auto_mapping(self, adapter_name: str) -> Optional[dict]:
        """What PEFT writes as auto_mapping when the adapter has no task_type: the base model's class and module,
        from which AutoPeftModel rebuilds the base."""
        if self.peft_config[adapter_name].task_type is not None:
            return None
        cls = type(self.base_model.model)
        return {"base_model_class": cls.__name__, "parent_library": cls.__module__}

    @staticmethod
    def _files(directory: str) -> tuple:
        """(config path, weights path) of a saved adapter: adapter_model.safetensors, else the adapter_model.bin
        of PEFT's save_pretrained(safe_serialization=False); an error naming what is missing."""
        directory = existing(directory)  # or what a save killed half way left in its place
        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"adapter file not found: {cfg_path}")
        if not os.path.isfile(w_path):
            if not os.path.isfile(os.path.join(directory, BIN_NAME)):
                raise FileNotFoundError(f"adapter file not found: {w_path} (nor {BIN_NAME} beside it)")
            w_path = os.path.join(directory, BIN_NAME)
        return cfg_path, w_path

    @staticmethod
    def _read_adapter(directory: str) -> tuple:
        """(config, weights by model path, config file, weights file) of a saved adapter."""
        from safetensors.torch import load_file

        cfg_path, w_path = LoraModel._files(directory)
        try:
            with open(cfg_path) as f:
                config = LoraConfig.from_peft(json.load(f), cfg_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if w_path.endswith(".bin"):
            try:  # as PEFT reads it: tensors only (no pickled code), onto the CPU
                weights = torch.load(w_path, weights_only=True, map_location="cpu")
            except Exception as e:  # noqa: BLE001  (pickle and zip raise several types for a damaged file)
                raise ValueError(f"{w_path} is not a readable PyTorch file: {e}") from None
            if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
                raise ValueError(f"{w_path}: expected a dict of tensors, got {type(weights).__name__}")
        else:
            try:
                weights = load_file(w_path)
            except Exception as e:  # noqa: BLE001  (safetensors raises several types for a damaged file)
                raise ValueError(f"{w_path} is not a readable safetensors file: {e}") from None
        # PEFT's keys carry the wrapper's prefix; ours are model paths.
        prefix = "base_model.model."
        odd = [k for k in weights if not (isinstance(k, str) and k.startswith(prefix))]
        if odd:
            raise ValueError(f"{w_path}: keys must start with {prefix!r}, got {odd[:5]}")
        return config, {k[len(prefix):]: v for k, v in weights.items()}, cfg_path, w_path

    @staticmethod
    def _check_weights(model: nn.Module, names: list, config: LoraConfig, weights: dict, path: str) -> list:
        """Every key and shape the adapter must have on this model; returns the modules_to_save paths."""
        saved = _saved_paths(model, config, names)
        expected = {}
        for name in names:
            m = model.get_submodule(name)
            in_f, out_f = _in_out(m.base_layer if isinstance(m, LoraLinear) else m)
            r = config.r_for(name)
            expected[f"{name}.lora_A.weight"] = (r, in_f)
            expected[f"{name}.lora_B.weight"] = (out_f, r)
            if config.use_dora:  # PEFT's key on disk (in memory: lora_magnitude_vector.<adapter>.weight)
                expected[f"{name}.lora_magnitude_vector"] = (out_f,)
        expected.update({k: tuple(p.shape) for k, p in _bias_params(model, config.bias, names, saved).items()})
        expected.update(saved_module_shapes(model, saved))
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"{path}: keys do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, shape in expected.items():
            if tuple(weights[key].shape) != shape:
                raise ValueError(f"{path}: {key} has shape {tuple(weights[key].shape)}, the model needs {shape}")
            if not weights[key].is_floating_point():
                raise ValueError(f"{path}: {key} is {weights[key].dtype}, expected a floating-point tensor")
        return saved

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, adapter_name: str = "default",
                        quantize_base: Optional[str] = None, quant_storage: torch.dtype = torch.uint8,
                        is_trainable: bool = False) -> "LoraModel":
        """Wrap `model` with the adapter saved in `directory` (ours or PEFT's). Checked before the model is touched.
        As in PEFT, for inference unless is_trainable=True: the adapter frozen and the model in eval mode (no
        dropout)."""
        config, weights, cfg_path, w_path = cls._read_adapter(directory)
        config.quantize_base, config.quant_storage = quantize_base, quant_storage
        cls._check_weights(model, find_targets(model, config, cfg_path), config, weights, w_path)
        _inject(model, config, random_state=0, adapter_name=adapter_name, initialize=False, origin=cfg_path)
        lora = cls(model, config, adapter_name)
        lora._copy_in(weights, adapter_name, config)
        if not is_trainable:
            lora._set_trainable(False)
            lora.eval()
        return lora

    def _check_trained_parts(self, config: LoraConfig, saved: list, adapter_name: str, origin: str) -> None:
        """Biases belong to the base: one adapter at most trains them (as in PEFT), and bias='all' does not
        mix with modules_to_save (see _saved_paths), whichever adapter brings which."""
        others = {n: c for n, c in self.peft_config.items() if n != adapter_name}
        owner = next((n for n, c in others.items() if c.bias != "none"), None)
        if config.bias != "none" and owner is not None:
            raise ValueError(f"{origin}: bias={config.bias!r}, but adapter {owner!r} already trains the biases; "
                             f"biases belong to the base, so only one adapter of a model may train them (as in PEFT)")
        others_wrapped = any(set(w.modules_to_save) - {adapter_name} for w in self.saved_modules().values())
        all_owner = any(c.bias == "all" for c in others.values())
        if (config.bias == "all" and others_wrapped) or (saved and all_owner):
            raise ValueError(f"{origin}: bias='all' together with modules_to_save (in another adapter of this model) "
                             f"is not supported; use bias='lora_only'")

    def _check_unmerged(self, origin: str) -> None:
        if any(layer.merged for layer in self.lora_layers().values()):
            raise RuntimeError(f"{origin}: the active adapter is merged into the base; call unmerge_adapter() first")

    def load_adapter(self, directory: str, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Load an adapter saved by lora_ext or PEFT as `adapter_name`, beside the others. It may target other
        modules and have other ranks than they do: modules only it targets get a LoRA layer (holding no
        adapter while another is active), and it is absent where it does not reach. Loading the active
        adapter's name with the same targets and ranks hot-swaps its weights in place (no module changes);
        otherwise the new weights replace it. Biases an adapter carries (bias != 'none') are written into
        the base, which every adapter shares. Everything is checked before the model changes; the cost is
        that adapter's size, whatever the others hold. As in PEFT, for inference unless is_trainable=True: the
        adapter frozen and the model in eval mode."""
        from .inits import changes_base_when_loaded

        config, weights, cfg_path, w_path = self._read_adapter(directory)
        if changes_base_when_loaded(config.init_lora_weights):
            raise ValueError(f"{cfg_path}: init_lora_weights={config.init_lora_weights!r}: such an adapter is read (as "
                             f"PEFT reads it) as meant for the original base, whose top its init moves into the "
                             f"adapter; that would change the base under this model's other adapters. Load it with "
                             f"LoraModel.from_pretrained onto the original base, or, if it was saved for the base its "
                             f"init left (base_state_dict), set init_lora_weights to true in its adapter_config.json")
        model = self.base_model.model
        names = find_targets(model, config, cfg_path)
        saved = self._check_weights(model, names, config, weights, w_path)
        self._check_trained_parts(config, saved, adapter_name, directory)
        like = self._adapter_like()
        config.fan_in_fan_out = any(is_conv1d(_unwrapped(model.get_submodule(n))) for n in names)
        active = adapter_name == self.active_adapter
        if active:
            self._check_unmerged(f"load_adapter({directory!r}, {adapter_name!r})")
        layers = self.lora_layers()
        in_place = active and sorted(self._pairs(adapter_name)) == sorted(names) and \
            all(config.r_for(n) == layers[n].r and config.use_dora == layers[n].use_dora for n in names)
        previous = self.peft_config.get(adapter_name)
        if previous is not None:  # the biases it trained are no longer its own unless the new one says so
            for p in _bias_params(model, previous.bias, list(self._pairs(adapter_name)), self.saved_modules()).values():
                p.requires_grad_(False)
        _add_saved_copies(model, saved, adapter_name, self.active_adapter)
        if in_place:
            self._copy_in(weights, adapter_name, config)
            for name in names:
                layers[name].set_adapter_weights(layers[name].lora_A, layers[name].lora_B, config.alpha_for(name),
                                                 config.use_rslora, config.lora_dropout)
            self.peft_config[adapter_name] = config
            self._after_load(active, is_trainable)
            return
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, LoraLinear):  # (in the module's mode: no dropout in a model in eval mode)
                _set_module(model, name, LoraLinear.without_adapter(module).train(module.training))
        self._stored[adapter_name] = {n: (weights[f"{n}.lora_A.weight"].to(like), weights[f"{n}.lora_B.weight"].to(like))
                                      for n in names}
        self._stored_magnitudes.pop(adapter_name, None)
        if config.use_dora:
            self._stored_magnitudes[adapter_name] = {n: weights[f"{n}.lora_magnitude_vector"].to(like) for n in names}
        self.peft_config[adapter_name] = config  # _install reads it
        if active:
            self._install(adapter_name)
        self._copy_in(weights, adapter_name, config)  # biases and modules_to_save copies
        self._after_load(active, is_trainable)

    def _after_load(self, active: bool, is_trainable: bool) -> None:
        """As PEFT's load_adapter: the loaded adapter trains only with is_trainable=True (set_adapter makes
        an adapter trainable when it becomes the active one); without it, the model goes to eval mode."""
        if active:
            self._set_trainable(is_trainable)
        if not is_trainable:
            self.eval()

    def _adapter_like(self) -> torch.Tensor:
        """A tensor of the adapters' device and dtype (the active adapter's, or any stored one's)."""
        for pairs in [self._pairs(self.active_adapter), *self._stored.values()]:
            for A, _ in pairs.values():
                return A.detach()
        raise RuntimeError("this model holds no adapter tensors")

    def _install(self, adapter_name: str) -> None:
        """Move `adapter_name` from beside the layers into them (the layers it does not target hold none)."""
        incoming = self._stored.pop(adapter_name)
        magnitudes = self._stored_magnitudes.pop(adapter_name, {})
        cfg = self.peft_config[adapter_name]
        for name, layer in self.lora_layers().items():
            if name in incoming:
                A, B = incoming[name]
                layer.set_adapter_weights(A, B, cfg.alpha_for(name), cfg.use_rslora, cfg.lora_dropout)
                layer.set_magnitude(magnitudes.get(name))
            else:
                layer.clear_adapter()

    def add_adapter(self, adapter_name: str, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                    modules_to_save: Optional[list] = None, rank_pattern: Optional[dict] = None,
                    alpha_pattern: Optional[dict] = None, use_dora: bool = False) -> None:
        """A new adapter on the same modules, initialised like PEFT's; activate it with set_adapter.
        modules_to_save gives it its own fresh copies of those modules (from the frozen originals). The
        inits that change the base weight (PiSSA, OLoRA, LoftQ) are for get_peft_model: the base is shared.
        As PEFT's add_adapter(name, config), `r` may be a LoraConfig (PEFT's or ours) whose targets are the
        active adapter's."""
        if is_config_object(r):
            return self.add_adapter(adapter_name, **self._keywords_of(r, adapter_name))
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} exists; load_adapter replaces its weights")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"add_adapter: init_lora_weights must be True, False or 'gaussian', got "
                             f"{init_lora_weights!r} (an init that changes the base weight would change it under "
                             f"every other adapter)")
        active = self.peft_config[self.active_adapter]
        if not isinstance(use_dora, bool):
            raise TypeError(f"add_adapter: use_dora must be True or False, got {use_dora!r}")
        origin = f"add_adapter({adapter_name!r})"
        # The model's task (PEFT: its task model's class) gives every adapter its own copy of the head.
        config = LoraConfig(r, lora_alpha, active.target_modules, lora_dropout, "none", use_rslora,
                            init_lora_weights, active.layers_to_transform, active.layers_pattern, modules_to_save,
                            fan_in_fan_out=active.fan_in_fan_out, rank_pattern=dict(rank_pattern or {}),
                            alpha_pattern=dict(alpha_pattern or {}), use_dora=use_dora, task_type=active.task_type)
        config.check(origin)
        if use_dora:  # its magnitudes start at the row norms of the unmerged base
            self._check_unmerged(f"add_adapter({adapter_name!r}, use_dora=True)")
        # The modules the active adapter targets, but those this one trains in full (as PEFT)
        targets = sorted(n for n in self._pairs(self.active_adapter) if not _in_saved_module(n, config))
        if not targets:
            raise ValueError(f"{origin}: every module the adapters target lies in modules_to_save "
                             f"{config.modules_to_save!r}: nothing is left to adapt")
        _check_ranks(self.base_model.model, config, targets)
        saved = _saved_paths(self.base_model.model, config, targets)
        self._check_trained_parts(config, saved, adapter_name, f"add_adapter({adapter_name!r})")
        stored, like, layers = {}, self._adapter_like(), self.lora_layers()
        for name in targets:
            rank, layer = config.r_for(name), layers[name]
            A = torch.empty(rank, layer.in_features, dtype=like.dtype, device=like.device)
            B = torch.empty(layer.out_features, rank, dtype=like.dtype, device=like.device)
            init_lora_(A, B, init_lora_weights)
            stored[name] = (A, B)
        magnitudes = {name: dora.init_magnitude(layers[name]._base_weight(), A, B,
                                                lora_scaling(A.shape[0], config.alpha_for(name), use_rslora), like.dtype)
                      for name, (A, B) in stored.items()} if use_dora else {}
        _add_saved_copies(self.base_model.model, saved, adapter_name, self.active_adapter)
        self._stored[adapter_name] = stored
        if magnitudes:
            self._stored_magnitudes[adapter_name] = magnitudes
        self.peft_config[adapter_name] = config

    def _keywords_of(self, config, adapter_name: str) -> dict:
        """add_adapter's keywords from a LoraConfig object; what add_adapter cannot follow is refused by name."""
        origin = f"add_adapter({adapter_name!r}, LoraConfig)"
        kwargs = kwargs_from_config_object(config, self.base_model.model)
        active = self.peft_config[self.active_adapter]
        def same(a, b):  # (a PEFT config holds its targets as a set)
            return sorted(a) == sorted(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

        differ = [k for k in ("target_modules", "layers_to_transform", "layers_pattern")
                  if not same(kwargs.get(k), getattr(active, k))]
        if differ:
            raise ValueError(f"{origin}: a new adapter goes on the active adapter's modules; the config's "
                             f"{', '.join(f'{k}={kwargs.get(k)!r}' for k in differ)} differ from its "
                             f"{', '.join(f'{k}={getattr(active, k)!r}' for k in differ)} (an adapter saved for other "
                             f"modules loads with load_adapter)")
        unsupported = [f"{k}={kwargs[k]!r}" for k, default in (("bias", "none"), ("loftq_config", {}))
                       if kwargs.get(k) not in (default, None)]
        if unsupported:
            raise ValueError(f"{origin}: add_adapter does not take {', '.join(unsupported)}")
        keep = ("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "modules_to_save",
                "rank_pattern", "alpha_pattern", "use_dora")
        return {k: kwargs[k] for k in keep if k in kwargs}

    @property
    def active_adapters(self) -> list:
        """PEFT's list of the active adapters: one here."""
        return [self.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The wrapped model itself (its LoRA layers in place), as PEFT's get_base_model."""
        return self.base_model.model

    def _set_trainable(self, trainable: bool) -> None:
        """The active adapter's tensors trainable or frozen: its LoRA layers', its modules_to_save copies and the
        biases it trains (bias != 'none'), as PEFT's set_adapter and inference mode do."""
        name, model = self.active_adapter, self.base_model.model
        for layer in self.lora_layers().values():
            layer.set_trainable(trainable)
        for wrapper in self.saved_modules().values():
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(trainable)
        config = self.peft_config[name]
        for p in _bias_params(model, config.bias, list(self._pairs(name)), self.saved_modules()).values():
            p.requires_grad_(trainable)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the one the model runs and, as in PEFT, trains (frozen with inference_mode=True);
        the adapters beside it are frozen. The base is untouched."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        if adapter_name == self.active_adapter:
            self._set_trainable(not inference_mode)
            return
        self._check_unmerged(f"set_adapter({adapter_name!r})")
        previous = {n: (A, B) for n, (A, B) in self._pairs(self.active_adapter).items()}
        previous_magnitudes = self._magnitudes(self.active_adapter)
        self._install(adapter_name)
        if previous_magnitudes:
            self._stored_magnitudes[self.active_adapter] = previous_magnitudes
        for wrapper in self.saved_modules().values():
            wrapper.active_adapter = adapter_name
            for name, copy in wrapper.modules_to_save.items():
                copy.requires_grad_(name == adapter_name)
        for t in [t for pair in previous.values() for t in pair] + list(previous_magnitudes.values()):
            t.requires_grad_(False)
        self._stored[self.active_adapter] = previous
        self.active_adapter = adapter_name
        self._set_trainable(not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.active_adapter:
            raise ValueError(f"adapter {adapter_name!r} is active; set_adapter to another one before deleting it")
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        del self.peft_config[adapter_name]
        self._stored.pop(adapter_name, None)
        self._stored_magnitudes.pop(adapter_name, None)
        for wrapper in self.saved_modules().values():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]

    @torch.no_grad()
    def _copy_in(self, weights: dict, adapter_name: str, config: LoraConfig) -> None:
        """Adapter tensors (model paths) into the live model: LoRA pairs when the adapter is active,
        biases, and the adapter's modules_to_save copies."""
        model = self.base_model.model
        pairs = self._pairs(adapter_name)
        if adapter_name == self.active_adapter:
            for name, (A, B) in pairs.items():
                copy_full_into(A, weights[f"{name}.lora_A.weight"])
                copy_full_into(B, weights[f"{name}.lora_B.weight"])
                if config.use_dora:
                    copy_full_into(model.get_submodule(name).lora_magnitude_vector,
                                   weights[f"{name}.lora_magnitude_vector"])
        for key, p in _bias_params(model, config.bias, list(pairs), self.saved_modules()).items():
            copy_full_into(p, weights[key])
        for path, wrapper in self.saved_modules().items():
            if adapter_name in wrapper.modules_to_save:
                for key, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    copy_full_into(t, weights[f"{path}.{key}"])

    # ---------------------------------------------------------------- merge / unload / disable
    def _check_mergeable(self) -> None:
        """Every layer merge() would refuse, before the first is merged (a refused call changes nothing)."""
        for layer in self.lora_layers().values():
            if layer.lora_A is not None and not layer.merged:
                layer.check_mergeable()

    def merge_adapter(self) -> None:
        self._check_mergeable()
        for layer in self.lora_layers().values():
            if layer.lora_A is not None:
                layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.lora_layers().values():
            if layer.merged:
                layer.unmerge()

    def _replace_layers(self, merge: bool, dequantize: bool = False) -> nn.Module:
        if merge:
            self._check_mergeable()
        model = self.base_model.model
        for name, layer in list(self.lora_layers().items()):
            if dequantize and isinstance(layer.base_layer, NF4Linear):
                if layer.merged:
                    layer.unmerge()  # restores the original 4-bit weight exactly; merged again below, in dense
                layer.base_layer = layer.base_layer.to_linear()
            if merge and not layer.merged:
                layer.merge()
            _set_module(model, name, layer.base_layer)
        for name, wrapper in self.saved_modules().items():
            wrapper.disabled = False
            _set_module(model, name, wrapper.active_module)
        if dequantize:
            for name, module in list(model.named_modules()):
                if isinstance(module, NF4Linear):
                    _set_module(model, name, module.to_linear())
        return model

    def base_state_dict(self) -> dict:
        """The base model's tensors under its own architecture's keys, as before get_peft_model: no adapter,
        each modules_to_save original, 4-bit weights dequantized to the dtype they came from. What PiSSA,
        OLoRA and LoftQ made of the base, to save with `model.save_pretrained(dir, state_dict=...)`."""
        out: dict = {}
        _plain_state(self.base_model.model, "", out)
        return out

    def merge_and_unload(self, dequantize: bool = False) -> nn.Module:
        """The plain model with the active adapter folded into its base weights; modules_to_save are
        replaced by the active adapter's trained copies (as PEFT). dequantize=True turns 4-bit bases
        into dense Linear layers first (the update is then added in full precision, rounded once), so
        the result is a plain model that `save_pretrained` writes in 16/32-bit."""
        return self._replace_layers(merge=True, dequantize=dequantize)

    def unload(self) -> nn.Module:
        """The plain model without the LoRA layers (nothing merged); as in PEFT, modules_to_save keep the
        active adapter's trained copies and trained biases stay."""
        return self._replace_layers(merge=False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base model alone: no LoRA update, the original modules_to_save. Trained biases
        (bias != 'none') are part of the base and stay, as in PEFT."""
        layers = list(self.lora_layers().values())
        if any(layer.merged for layer in layers):
            raise RuntimeError("disable_adapter: the adapter is merged into the base; call unmerge_adapter() first")
        switches = layers + list(self.saved_modules().values())
        for m in switches:
            m.disabled = True
        try:
            yield
        finally:
            for m in switches:
                m.disabled = False


def _forward_signature() -> inspect.Signature:
    """What LoraModel.forward shows to inspection: transformers.Trainer keeps only the batch columns a model's
    forward names (remove_unused_columns) and takes its label names from it (its evaluation loss), and PEFT's
    task models name these. The call itself passes everything on to the wrapped model."""
    P = inspect.Parameter
    names = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels", "use_cache",
             "output_attentions", "output_hidden_states", "return_dict", "cache_position", "logits_to_keep",
             "token_type_ids", "pixel_values", "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds",
             "encoder_outputs")
    return inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD)]
                             + [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in names]
                             + [P("adapter_names", P.KEYWORD_ONLY, default=None), P("kwargs", P.VAR_KEYWORD)])


LoraModel.forward.__signature__ = _forward_signature()
