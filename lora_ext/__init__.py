"""lora_ext: LoRA and QLoRA kernels for PyTorch.

NF4 4-bit weights bit-compatible with bitsandbytes, with CPU and CUDA kernels registered as
torch.ops.lora_ext.*. The package imports without the compiled library (lora_ext.reference stays
usable); calling a compiled op then says how to build it.
"""
from . import reference
from ._library import HAS_C, build_config
from .dora import dora_caching
from .lora import LoraLinear, lora_linear, lora_scaling
from .nf4 import NF4Linear, NF4Weight, dequantize_nf4, nf4_linear, quantize_nf4
from .ops import merge_lora_, unmerge_lora_
from .merge import merge_nf4
from .model import LoraConfig, LoraModel, get_peft_model
from .loraplus import create_loraplus_optimizer
from .multi_lora import multi_lora_linear
from .trainer import AdapterCheckpoints

__version__ = "0.1.0"

__all__ = [
    "AdapterCheckpoints",
    "HAS_C",
    "LoraTrainer",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "NF4Linear",
    "NF4Weight",
    "build_config",
    "create_loraplus_optimizer",
    "dequantize_nf4",
    "dora_caching",
    "get_peft_model",
    "lora_linear",
    "lora_scaling",
    "merge_lora_",
    "merge_nf4",
    "multi_lora_linear",
    "unmerge_lora_",
    "nf4_linear",
    "quantize_nf4",
    "reference",
]


def __getattr__(name: str):
    if name == "LoraTrainer":  # (transformers imported on first use)
        from . import trainer

        return trainer.LoraTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
