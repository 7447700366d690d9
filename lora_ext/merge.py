"""Merging a LoRA update into its base: dense W in place (ops.merge_lora_), and NF4 by dequantize,
add, requantize, with the error the 4-bit rounding introduced measured against the exact update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops, reference
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4


@dataclass(frozen=True)
class MergeError:
    """How far the merged 4-bit weight's change is from the exact update scale * B @ A."""

    max_abs: float
    rel_frobenius: float  # ||dequant(new) - dequant(old) - exact||_F / ||exact||_F


def merge_nf4(qw: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[NF4Weight, MergeError]:
    """A new NF4Weight for dequant(qw) + scale * B @ A (fp64 delta, added to the fp32 dequantized
    weight, rounded once to fp32, quantized exactly as bitsandbytes would), and its MergeError."""
    if len(qw.shape) != 2:
        raise ValueError(f"merge_nf4 needs a 2-D NF4 weight, got shape {tuple(qw.shape)}")
    w = dequantize_nf4(qw, torch.float32)
    old = w.clone()
    ops.merge_lora_(w, A, B, scale)
    new = quantize_nf4(w, qw.blocksize, qw.double_quant, qw.quant_storage)
    new = NF4Weight(new.data, new.absmax, qw.shape, qw.dtype, new.blocksize, new.nested_absmax, new.nested_code,
                    new.offset, new.nested_blocksize)
    exact = (B.double() @ A.double()) * scale
    err = dequantize_nf4(new, torch.float32).double() - old.double() - exact
    denom = exact.norm().item()
    return new, MergeError(err.abs().max().item() if err.numel() else 0.0,
                           err.norm().item() / denom if denom > 0 else 0.0)


def merge_nf4_reference(qw: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float):
    """The same, from lora_ext.reference alone: the oracle for merge_nf4's bytes."""
    w = reference.dequantize_nf4(qw.packed, qw.absmax, qw.blocksize, qw.shape, torch.float32, qw.nested_absmax,
                                 qw.nested_code, qw.offset, qw.nested_blocksize)
    reference.merge_lora_(w, A, B, scale)
    packed, absmax = reference.quantize_nf4(w, qw.blocksize)
    if not qw.double_quant:
        return packed, absmax, None, None
    q, nested, offset = reference.double_quant(absmax, reference.dynamic_map().to(w.device))
    return packed, q, nested, offset
