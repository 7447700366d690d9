"""An adapter's configuration, as PEFT writes it (adapter_config.json) and as PEFT's `LoraConfig`
object carries it: lora_ext's LoraConfig, its conversions both ways, and PEFT's per-module rank and
alpha patterns."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

BIAS_MODES = ("none", "all", "lora_only")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG_NAME = "adapter_config.json"

# Fields of PEFT's LoraConfig that lora_ext takes, and those that only describe the file or are
# derived from the model (task type, fan_in_fan_out). Any other field must keep PEFT's default.
_TAKEN = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "init_lora_weights",
          "layers_to_transform", "modules_to_save", "rank_pattern", "alpha_pattern", "loftq_config", "use_dora")
_BOOKKEEPING = ("peft_type", "task_type", "base_model_name_or_path", "revision", "fan_in_fan_out", "auto_mapping",
                "runtime_config", "peft_version", "inference_mode")
# PEFT LoraConfig fields whose default is not None/False/empty, for when peft itself is not installed.
_PEFT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}


@dataclass
class LoraConfig:
    r: int = 16
    lora_alpha: float = 16
    target_modules: Union[list, str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[int, list]] = None
    modules_to_save: Optional[list] = None
    quantize_base: Optional[str] = None
    quant_storage: torch.dtype = torch.uint8  # of the NF4 packed bytes (bitsandbytes' bnb_4bit_quant_storage)
    fan_in_fan_out: bool = False  # the targets are HF Conv1D (set at injection, from the modules themselves)
    rank_pattern: dict = field(default_factory=dict)  # module-name pattern -> r (PEFT's rule: pattern_key)
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> lora_alpha
    loftq_config: dict = field(default_factory=dict)  # {"loftq_bits": 4, "loftq_iter": N} with init "loftq"
    use_dora: bool = False  # DoRA: a magnitude per output feature beside A and B (lora_ext/dora.py)

    def r_for(self, module_name: str) -> int:
        """The rank of the layer at `module_name`: rank_pattern's first matching key, else r."""
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def to_peft(self, base_model_name_or_path=None) -> dict:
        """adapter_config.json as PEFT writes it for a LoRA adapter."""
        return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
                "r": self.r, "lora_alpha": self.lora_alpha, "target_modules": self.target_modules,
                "lora_dropout": self.lora_dropout, "bias": self.bias, "use_rslora": self.use_rslora,
                "init_lora_weights": self.init_lora_weights, "layers_to_transform": self.layers_to_transform,
                "layers_pattern": None, "modules_to_save": self.modules_to_save,
                "fan_in_fan_out": self.fan_in_fan_out, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern), "loftq_config": dict(self.loftq_config),
                "use_dora": self.use_dora, "lora_bias": False, "inference_mode": True, "revision": None}

    @classmethod
    def from_peft(cls, cfg: dict, path: str = CONFIG_NAME) -> "LoraConfig":
        """From adapter_config.json (PEFT's or ours)."""
        if cfg.get("peft_type") != "LORA":
            raise ValueError(f"{path}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
        # fan_in_fan_out only says the targets are Conv1D, which the modules themselves tell us.
        unsupported = _unsupported_fields(cfg, _peft_defaults())
        if unsupported:
            raise ValueError(f"{path}: {', '.join(unsupported)} is not supported by lora_ext yet")
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
        if missing:
            raise ValueError(f"{path}: missing {missing}")
        if (cfg.get("bias") or "none") not in BIAS_MODES:
            raise ValueError(f"{path}: bias must be one of {BIAS_MODES}, got {cfg['bias']!r}")
        config = cls(r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                     lora_dropout=float(cfg.get("lora_dropout") or 0.0), bias=cfg.get("bias") or "none",
                     use_rslora=bool(cfg.get("use_rslora")), init_lora_weights=cfg.get("init_lora_weights", True),
                     layers_to_transform=cfg.get("layers_to_transform"), modules_to_save=cfg.get("modules_to_save"),
                     rank_pattern=dict(cfg.get("rank_pattern") or {}),
                     alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
                     loftq_config=dict(cfg.get("loftq_config") or {}), use_dora=bool(cfg.get("use_dora")))
        check_patterns(config, path)
        return config


def pattern_key(patterns: dict, module_name: str) -> Optional[str]:
    """PEFT's get_pattern_key: the first key that matches the end of the module name at a '.' boundary
    (keys are regular expressions), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_alpha(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def check_patterns(config: LoraConfig, origin: str) -> None:
    for name, pattern, valid, wanted in (("rank_pattern", config.rank_pattern, _is_rank, "an integer >= 1"),
                                         ("alpha_pattern", config.alpha_pattern, _is_alpha, "a number >= 0")):
        if not isinstance(pattern, dict):
            raise ValueError(f"{origin}: {name} must be a dict of module-name pattern -> value, got {pattern!r}")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{origin}: {name} key {key!r} is not a regular expression: {e}") from None
            if not valid(value):
                raise ValueError(f"{origin}: {name}[{key!r}] must be {wanted}, got {value!r}")


def is_config_object(value) -> bool:
    """A PEFT LoraConfig (or lora_ext's), told by its fields rather than its class, so peft stays optional."""
    return all(hasattr(value, k) for k in ("r", "lora_alpha", "target_modules")) and not isinstance(value, dict)


def as_dict(value) -> dict:
    """A dict, a dataclass (peft.LoftQConfig) or an object's fields as a dict; None as {}."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(vars(value))


def _peft_defaults() -> dict:
    """PEFT's LoraConfig defaults by field, or the few that are not None/False/empty when peft is absent."""
    try:
        import peft

        return _fields(peft.LoraConfig())
    except Exception:  # noqa: BLE001  (not installed, or a version whose LoraConfig needs arguments)
        return dict(_PEFT_DEFAULTS)


def _unsupported_fields(fields: dict, defaults: Optional[dict]) -> list:
    """'name=value' for each field lora_ext does not take that asks for something: it differs from the
    default (None, False or empty where no default is known)."""
    out = []
    for name, value in fields.items():
        if name in _TAKEN or name in _BOOKKEEPING:
            continue
        known = defaults is not None and name in defaults
        if not (defaults[name] == value if known else value in (None, False, {}, [], ())):
            out.append(f"{name}={value!r}")
    return out


def _fields(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def kwargs_from_config_object(config, model=None) -> dict:
    """get_peft_model's keywords from a PEFT LoraConfig object. A field lora_ext does not support that
    differs from PEFT's default is named in the error (compared with the class's own defaults when it can
    be built without arguments, else with None, False and empty containers)."""
    if isinstance(config, LoraConfig):
        return {k: getattr(config, k) for k in _TAKEN}
    try:
        defaults = _fields(type(config)())
    except Exception:  # noqa: BLE001  (a duck-typed object that needs arguments)
        defaults = None
    unsupported = _unsupported_fields(_fields(config), defaults)
    if getattr(config, "inference_mode", False):
        unsupported.append("inference_mode=True (load a trained adapter with LoraModel.from_pretrained)")
    peft_type = getattr(config, "peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)) != "LORA":
        raise ValueError(f"get_peft_model: lora_ext makes LoRA adapters; the config's peft_type is {peft_type!r}")
    if unsupported:
        raise ValueError(f"get_peft_model: the LoraConfig sets fields lora_ext does not support: "
                         f"{', '.join(unsupported)}")
    kwargs = {k: getattr(config, k) for k in _TAKEN if hasattr(config, k)}
    targets = kwargs.get("target_modules")
    if targets is None:
        kwargs["target_modules"] = _peft_default_targets(model)
    elif not isinstance(targets, str):
        kwargs["target_modules"] = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    kwargs["loftq_config"] = as_dict(kwargs.get("loftq_config"))
    kwargs["rank_pattern"] = dict(kwargs.get("rank_pattern") or {})
    kwargs["alpha_pattern"] = dict(kwargs.get("alpha_pattern") or {})
    return kwargs


def _peft_default_targets(model) -> list:
    """PEFT's targets for LoraConfig(target_modules=None): its table by model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:
        table = {}
    if model_type not in table:
        raise ValueError(f"get_peft_model: the LoraConfig has target_modules=None and PEFT has no default targets "
                         f"for model type {model_type!r}; name them (e.g. target_modules=['q_proj', 'v_proj'])")
    return list(table[model_type])
