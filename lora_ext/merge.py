"""Merging a LoRA update into its base: dense W in place (ops.merge_lora_), and NF4 by dequantize,
add, requantize, with the error the 4-bit rounding introduced measured against the exact update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops, reference
from ._library import require_compiled
from .nf4 import NF4Weight, dequantize_nf4


@dataclass(frozen=True)
class MergeError:
    """How far the merged 4-bit weight's change is from the exact update scale * B @ A."""

    max_abs: float
    rel_frobenius: float  # ||dequant(new) - dequant(old) - exact||_F / ||exact||_F


def merge_nf4(qw: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[NF4Weight, MergeError]:
    """A new NF4Weight for dequant(qw) + scale * B @ A, made in one pass over the blocks (dequantize,
    add the fp64 delta rounded once to fp32, quantize exactly as bitsandbytes would; the absmax is
    then double-quantized if qw's was), and the MergeError against the exact update."""
    if not isinstance(qw, NF4Weight) or len(qw.shape) != 2:
        raise ValueError(f"merge_nf4 needs a 2-D NF4Weight, got {getattr(qw, 'shape', type(qw).__name__)}")
    require_compiled("merge_nf4")
    packed, absmax = torch.ops.lora_ext.merge_nf4(qw.packed, qw.absmax, qw.blocksize, list(qw.shape), A, B,
                                                  float(scale), qw.nested_absmax, qw.nested_code, qw.offset,
                                                  qw.nested_blocksize)
    new = NF4Weight(packed, absmax, qw.shape, qw.dtype, qw.blocksize)
    if qw.double_quant:
        code = qw.nested_code
        q, nested, offset = ops.double_quant(absmax, code, qw.nested_blocksize)
        new = NF4Weight(packed, q, qw.shape, qw.dtype, qw.blocksize, nested, code.clone(), offset,
                        qw.nested_blocksize)
    if qw.quant_storage != torch.uint8:
        new = new.with_storage(qw.quant_storage)
    return new, merge_error(qw, new, A, B, scale)


def merge_error(old: NF4Weight, new: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float) -> MergeError:
    """Compare the weight change against scale * B @ A in fp64, a block of rows at a time (the
    exact update of a 70B layer in fp64 would not fit beside it)."""
    w_old, w_new = dequantize_nf4(old, torch.float32), dequantize_nf4(new, torch.float32)
    A64 = A.double()
    rows = max(1, (1 << 22) // max(1, w_old.shape[1]))
    max_abs = err_sq = exact_sq = 0.0
    for i in range(0, w_old.shape[0], rows):
        exact = (B[i:i + rows].double() @ A64) * scale
        err = w_new[i:i + rows].double() - w_old[i:i + rows].double() - exact
        if err.numel():
            max_abs = max(max_abs, err.abs().max().item())
        err_sq += err.pow(2).sum().item()
        exact_sq += exact.pow(2).sum().item()
    return MergeError(max_abs, (err_sq / exact_sq) ** 0.5 if exact_sq > 0 else 0.0)


def merge_nf4_reference(qw: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float):
    """The same bytes from lora_ext.reference alone (dequantize, merge_lora_, quantize, double quant)."""
    packed, absmax = reference.merge_nf4(qw.packed, qw.absmax, qw.blocksize, qw.shape, A, B, scale,
                                         qw.nested_absmax, qw.nested_code, qw.offset, qw.nested_blocksize)
    if not qw.double_quant:
        return packed, absmax, None, None
    q, nested, offset = reference.double_quant(absmax, qw.nested_code, qw.nested_blocksize)
    return packed, q, nested, offset
