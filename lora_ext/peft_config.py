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
          "layers_to_transform", "layers_pattern", "modules_to_save", "rank_pattern", "alpha_pattern", "loftq_config",
          "use_dora", "task_type")
_BOOKKEEPING = ("peft_type", "base_model_name_or_path", "revision", "fan_in_fan_out", "auto_mapping",
                "runtime_config", "peft_version", "inference_mode")
# PEFT LoraConfig fields whose default is not None/False/empty, for when peft itself is not installed.
_PEFT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}
# PEFT's TaskType values
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# PEFT's task models (peft_model.py: PeftModelForSequenceClassification, ...) train their heads in full: these
# names join modules_to_save, and so PEFT's adapter files of those tasks carry the heads' weights.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


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
    layers_pattern: Optional[Union[str, list]] = None  # the name(s) before the layer index (PEFT's rule)
    modules_to_save: Optional[list] = None
    quantize_base: Optional[str] = None
    quant_storage: torch.dtype = torch.uint8  # of the NF4 packed bytes (bitsandbytes' bnb_4bit_quant_storage)
    fan_in_fan_out: bool = False  # the targets are HF Conv1D (set at injection, from the modules themselves)
    rank_pattern: dict = field(default_factory=dict)  # module-name pattern -> r (PEFT's rule: pattern_key)
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> lora_alpha
    loftq_config: dict = field(default_factory=dict)  # {"loftq_bits": 4, "loftq_iter": N} with init "loftq"
    use_dora: bool = False  # DoRA: a magnitude per output feature beside A and B (lora_ext/dora.py)
    task_type: Optional[str] = None  # PEFT's TaskType; SEQ_CLS etc. add their heads to modules_to_save

    def __post_init__(self):
        # PEFT's task models add their heads to modules_to_save (only names not there yet: a config read back
        # from a file of such a task already has them).
        heads = TASK_HEADS.get(self.task_type, []) if isinstance(self.task_type, str) else []
        if heads and (self.modules_to_save is None or isinstance(self.modules_to_save, list)):
            self.modules_to_save = list(self.modules_to_save or []) + [h for h in heads if h not in
                                                                         (self.modules_to_save or [])]

    def check(self, origin: str) -> None:
        """Every field's type and range, and PEFT's rules between fields (its LoraConfig.__post_init__), so a
        bad config is refused before anything changes; `origin` (the call, or the file) starts each message."""
        def refuse(name, wanted):
            raise ValueError(f"{origin}: {name} must be {wanted}, got {getattr(self, name)!r}")

        layers, pattern = self.layers_to_transform, self.layers_pattern
        for name, ok, wanted in (
                ("r", _is_rank(self.r), "an integer >= 1"),
                ("lora_alpha", _is_alpha(self.lora_alpha), "a number >= 0"),
                ("lora_dropout", _is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "a number in [0, 1)"),
                ("use_rslora", isinstance(self.use_rslora, bool), "True or False"),
                ("use_dora", isinstance(self.use_dora, bool), "True or False"),
                ("bias", self.bias in BIAS_MODES, f"one of {BIAS_MODES}"),
                ("target_modules", isinstance(self.target_modules, str) or _is_names(self.target_modules),
                 "a regular expression (str) or a list of module names"),
                ("layers_to_transform", layers is None or _is_index(layers) or
                 (isinstance(layers, list) and all(map(_is_index, layers))), "None, a layer index or a list of them"),
                ("layers_pattern", pattern is None or isinstance(pattern, str) or _is_names(pattern),
                 "None, a name or a list of names"),
                ("modules_to_save", self.modules_to_save is None or _is_names(self.modules_to_save),
                 "None or a list of module names"),
                ("task_type", self.task_type is None or self.task_type in TASK_TYPES, f"None or one of {TASK_TYPES}")):
            if not ok:
                refuse(name, wanted)
        # PEFT's own rules and words (LoraConfig.__post_init__)
        if isinstance(self.target_modules, str) and layers is not None:
            raise ValueError(f"{origin}: `layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and pattern is not None:
            raise ValueError(f"{origin}: `layers_pattern` cannot be used when `target_modules` is a str.")
        if pattern and layers is None:
            raise ValueError(f"{origin}: When `layers_pattern` is specified, `layers_to_transform` must also be "
                             f"specified.")
        check_patterns(self, origin)

    def r_for(self, module_name: str) -> int:
        """The rank of the layer at `module_name`: rank_pattern's first matching key, else r."""
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def to_peft(self, base_model_name_or_path=None, auto_mapping: Optional[dict] = None) -> dict:
        """adapter_config.json as PEFT writes it for a LoRA adapter. auto_mapping: the base model's class and
        module, which PEFT writes when task_type is None (AutoPeftModel builds the base from it)."""
        return {"peft_type": "LORA", "task_type": self.task_type, "auto_mapping": auto_mapping,
                "base_model_name_or_path": base_model_name_or_path,
                "r": self.r, "lora_alpha": self.lora_alpha, "target_modules": self.target_modules,
                "lora_dropout": self.lora_dropout, "bias": self.bias, "use_rslora": self.use_rslora,
                "init_lora_weights": self.init_lora_weights, "layers_to_transform": self.layers_to_transform,
                "layers_pattern": self.layers_pattern, "modules_to_save": self.modules_to_save,
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
        def value_or(name, default):  # null in the file is the default; any other value is checked, never coerced
            return default if cfg.get(name) is None else cfg[name]

        config = cls(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                     lora_dropout=value_or("lora_dropout", 0.0), bias=value_or("bias", "none"),
                     use_rslora=value_or("use_rslora", False), init_lora_weights=value_or("init_lora_weights", True),
                     layers_to_transform=cfg.get("layers_to_transform"),
                     layers_pattern=cfg.get("layers_pattern") or None, modules_to_save=cfg.get("modules_to_save"),
                     rank_pattern=value_or("rank_pattern", {}), alpha_pattern=value_or("alpha_pattern", {}),
                     loftq_config=value_or("loftq_config", {}), use_dora=value_or("use_dora", False),
                     task_type=cfg.get("task_type"))
        config.check(path)
        config.loftq_config = as_dict(config.loftq_config)
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_alpha(value) -> bool:
    return _is_number(value) and value >= 0


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_names(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


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
        default = defaults.get(name) if defaults is not None and name in defaults else None
        # An empty container where PEFT's default is None asks for nothing either (exclude_modules=[], which
        # PEFT's LoraConfig turns into set(), ...).
        if not (value == default or (default is None and value in (None, False, {}, [], (), set()))):
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
    task_type = kwargs.get("task_type")
    kwargs["task_type"] = getattr(task_type, "value", task_type)  # PEFT's TaskType enum: its name
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
