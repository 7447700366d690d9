"""Python face of every compiled operator: thin wrappers and fake kernels (torch.compile, meta).

Schemas live in csrc/ops.cpp; kernels in csrc/<area>/. Each wrapper raises a build hint when
lora_ext._C is missing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._library import HAS_C, require_compiled

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _valid_blocksize(b: int) -> bool:
    return 32 <= b <= 4096 and (b & (b - 1)) == 0


def quantize_nf4_packed(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize A (any shape) -> (packed uint8 ((n+1)//2, 1), absmax float32 per block)."""
    require_compiled("quantize_nf4")
    return torch.ops.lora_ext.quantize_nf4(A, blocksize)


def double_quant(absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """-> (qabsmax uint8, nested_absmax float32, offset 0-dim float32)."""
    require_compiled("double_quant")
    return torch.ops.lora_ext.double_quant(absmax, code, blocksize)


def dequantize_nf4_packed(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Sequence[int],
                          dtype: torch.dtype, nested_absmax: Optional[torch.Tensor] = None,
                          nested_code: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                          nested_blocksize: int = 256) -> torch.Tensor:
    require_compiled("dequantize_nf4")
    return torch.ops.lora_ext.dequantize_nf4(packed, absmax, blocksize, list(shape), dtype, nested_absmax,
                                             nested_code, offset, nested_blocksize)


def dequantize_nf4_out(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor,
                       nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
                       offset: Optional[torch.Tensor] = None, nested_blocksize: int = 256) -> torch.Tensor:
    """Dequantize into `out` (a reused workspace: its shape and dtype are the result's)."""
    require_compiled("dequantize_nf4_out")
    torch.ops.lora_ext.dequantize_nf4_out(packed, absmax, blocksize, out, nested_absmax, nested_code, offset,
                                          nested_blocksize)
    return out


if HAS_C:

    @torch.library.register_fake("lora_ext::quantize_nf4")
    def _quantize_nf4_fake(A, blocksize):
        torch._check(A.dtype in _FLOAT_TYPES, lambda: f"quantize_nf4: input must be float32/float16/bfloat16, got {A.dtype}")
        torch._check(_valid_blocksize(blocksize), lambda: f"blocksize must be a power of two in [32, 4096], got {blocksize}")
        n = A.numel()
        return (A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
                A.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))

    @torch.library.register_fake("lora_ext::double_quant")
    def _double_quant_fake(absmax, code, blocksize):
        torch._check(absmax.dtype == torch.float32, lambda: f"double_quant: absmax must be float32, got {absmax.dtype}")
        torch._check(code.numel() == 256, lambda: f"double_quant: code must have 256 entries, got {code.numel()}")
        n = absmax.numel()
        return (absmax.new_empty((n,), dtype=torch.uint8),
                absmax.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32),
                absmax.new_empty((), dtype=torch.float32))

    @torch.library.register_fake("lora_ext::dequantize_nf4")
    def _dequantize_nf4_fake(packed, absmax, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
                             offset=None, nested_blocksize=256):
        n = math.prod(shape)
        torch._check(_valid_blocksize(blocksize), lambda: f"blocksize must be a power of two in [32, 4096], got {blocksize}")
        torch._check(dtype in _FLOAT_TYPES, lambda: f"dequantize_nf4: dtype must be float32/float16/bfloat16, got {dtype}")
        torch._check(packed.dtype == torch.uint8, lambda: f"dequantize_nf4: packed weight must be uint8, got {packed.dtype}")
        torch._check(packed.numel() == (n + 1) // 2,
                     lambda: f"dequantize_nf4: packed weight must have {(n + 1) // 2} elements, got {packed.numel()}")
        torch._check(absmax.numel() == (n + blocksize - 1) // blocksize,
                     lambda: f"dequantize_nf4: absmax must have one entry per block")
        return packed.new_empty(tuple(shape), dtype=dtype)

    @torch.library.register_fake("lora_ext::dequantize_nf4_out")
    def _dequantize_nf4_out_fake(packed, absmax, blocksize, out, nested_absmax=None, nested_code=None, offset=None,
                                 nested_blocksize=256):
        torch._check(out.dtype in _FLOAT_TYPES, lambda: f"dequantize_nf4_out: out must be float32/float16/bfloat16, got {out.dtype}")
        torch._check(packed.numel() == (out.numel() + 1) // 2,
                     lambda: f"dequantize_nf4_out: packed weight must have {(out.numel() + 1) // 2} elements, got {packed.numel()}")
        return None
