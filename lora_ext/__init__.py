"""lora_ext: LoRA and QLoRA kernels for PyTorch.

NF4 4-bit weights bit-compatible with bitsandbytes, with CPU and CUDA kernels registered as
torch.ops.lora_ext.*. The package imports without the compiled library (lora_ext.reference stays
usable); calling a compiled op then says how to build it.
"""
from . import reference
from ._library import HAS_C, build_config
from .nf4 import NF4Linear, NF4Weight, dequantize_nf4, nf4_linear, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "HAS_C",
    "NF4Linear",
    "NF4Weight",
    "build_config",
    "dequantize_nf4",
    "nf4_linear",
    "quantize_nf4",
    "reference",
]
