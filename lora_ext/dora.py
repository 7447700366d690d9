"""DoRA (Liu et al., 2024; PEFT's `use_dora=True`): the adapted weight W + s B A split into a magnitude
m (one per output feature, PEFT's `lora_magnitude_vector`) and a direction, with PEFT's math:

    y = base(x) + (g - 1) * (x W^T) + g * s * dropout(x) A^T B^T,   g = m / ||W + s B A||_row  (detached)

and, with dropout active in training, x W^T taken on the dropped-out x as PEFT does. The row norms are
computed without the out x in matrix PEFT builds at every forward:

    ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i (A W_i^T) + s^2 B_i (A A^T) B_i^T

||W_i||^2 is a constant of the frozen base (cached per weight version); A W^T is one pass over W (dense:
inside the dora_weight_norm operator, which reads W in its own dtype; NF4: the fused 4-bit kernel, which
reads the packed weight). Neither writes anything of W's size. All in fp32, an r x out and an r x r matrix
beside the adapter itself. Inside dora_caching(), forwards with grad off reuse each layer's norm while A, B
and W are unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from typing import Iterator, Optional, Union

import torch

from . import dora_ops, ops
from .nf4 import NF4Weight

_ROW_BLOCK_ELEMENTS = 1 << 22  # fp32 elements of W converted at a time (16 MiB)
_NORMS: contextvars.ContextVar = contextvars.ContextVar("lora_ext_dora_norms", default=None)


@contextlib.contextmanager
def dora_caching() -> Iterator[None]:
    """Inside this context, a DoRA layer's forward with grad off (generation, evaluation) takes ||W + s B A||
    once and reuses it while A, B and W are unchanged, as PEFT's opt-in `peft.helpers.DoraCaching` does.
    Without it a decode step computes A W^T, r passes of multiply-adds over W, for every layer and token.
    Unchanged means the same tensors, storage and version counter (Fingerprint): in-place updates (an optimizer
    step, load_state_dict, copy_) and new adapters are seen, writes through `.data` or outside PyTorch are not.
    Forwards with grad on, under torch.compile, or over inference tensors (no version counter) always recompute. The norms are dropped at exit; contexts nest.
    LoraModel.generate runs inside one."""
    if _NORMS.get() is not None:
        yield
        return
    token = _NORMS.set({})
    try:
        yield
    finally:
        _NORMS.reset(token)


class Fingerprint:
    """What identifies a tensor's contents while nothing writes around its version counter: the tensor object
    itself, held weakly (a new tensor allocated where a freed one was is another tensor, though its address,
    version, shape and dtype may all match), and its storage, version, shape and dtype (`p.data = other` keeps
    the object and its version but moves the storage)."""

    __slots__ = ("_ref", "_state")

    def __init__(self, t: torch.Tensor):
        self._ref = weakref.ref(t)
        self._state = (t.data_ptr(), t._version, tuple(t.shape), t.dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fingerprint):
            return NotImplemented
        held = self._ref()
        return held is not None and held is other._ref() and self._state == other._state

    __hash__ = None  # (compared, never a dict key)


def fingerprint(t: torch.Tensor) -> Optional[Fingerprint]:
    """t's Fingerprint; None for an inference tensor, which has no version counter (nothing keyed on it is cached)."""
    return None if t.is_inference() else Fingerprint(t)


def active_norm_cache() -> Optional[dict]:
    """dora_caching()'s norms by layer where they may be used: inside it, grad off, not compiling."""
    # is_compiling first: torch 2.11's dynamo cannot trace ContextVar.get (an error under fullgraph).
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return None
    return _NORMS.get()


def row_blocks(rows: int, cols: int):
    """Ranges of rows of an out x in weight small enough to convert (fp32, or fp64 for merges) a block at a time."""
    step = max(1, _ROW_BLOCK_ELEMENTS // max(1, cols))
    return ((i, min(rows, i + step)) for i in range(0, rows, step))


def _nf4_row_blocks(qw: NF4Weight):
    """(i0, i1, dense fp32 rows i0..i1) of an NF4 weight, dequantized a block of rows at a time. A block starts on
    an absmax block (and, double-quantized, on a nested block), so its bytes and scales are slices of qw's."""
    rows, cols = qw.shape
    unit = qw.blocksize * (qw.nested_blocksize if qw.double_quant else 1)  # elements per scale boundary
    rows_unit = unit // math.gcd(unit, cols) if cols else 1
    step = max(rows_unit, _ROW_BLOCK_ELEMENTS // max(1, cols) // rows_unit * rows_unit)
    packed = qw.packed.reshape(-1)
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        e0, e1 = i0 * cols, i1 * cols
        b0, b1 = e0 // qw.blocksize, -(-e1 // qw.blocksize)
        nested = ()
        if qw.double_quant:
            n0, n1 = b0 // qw.nested_blocksize, -(-b1 // qw.nested_blocksize)
            nested = (qw.nested_absmax[n0:n1], qw.nested_code, qw.offset, qw.nested_blocksize)
        yield i0, i1, ops.dequantize_nf4_packed(packed[e0 // 2:(e1 + 1) // 2].reshape(-1, 1), qw.absmax[b0:b1],
                                                qw.blocksize, (i1 - i0, cols), torch.float32, *nested)


@torch.no_grad()
def row_norms_squared(weight: Union[torch.Tensor, NF4Weight]) -> torch.Tensor:
    """||W_i||^2 in fp32 for a dense (out x in) or NF4 weight, a block of rows at a time: a constant of the
    frozen base, which callers cache."""
    out = torch.empty(weight.shape[0], dtype=torch.float32,
                      device=weight.packed.device if isinstance(weight, NF4Weight) else weight.device)
    if isinstance(weight, NF4Weight):
        blocks = _nf4_row_blocks(weight)
    else:
        blocks = ((i0, i1, weight[i0:i1].float()) for i0, i1 in row_blocks(*weight.shape))
    for i0, i1, rows in blocks:
        out[i0:i1] = rows.pow(2).sum(1)
    return out


@torch.no_grad()
def weight_norm(weight: Union[torch.Tensor, NF4Weight], A: torch.Tensor, B: torch.Tensor, scaling: float,
                w_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||W + s B A|| per output row (fp32, detached), from w_sq = ||W_i||^2 (row_norms_squared) when given: one
    operator over a dense W (dora_weight_norm, which reads W in its own dtype); over NF4, A W^T from the fused
    4-bit GEMV (which reads the packed weight, no dequantized W), then dora_weight_norm_from_a_w_t."""
    if w_sq is None:
        w_sq = row_norms_squared(weight)
    A, B = A.detach(), B.detach()
    if isinstance(weight, NF4Weight):
        A32 = A.float()
        a_w_t = ops.nf4_linear(A32, weight.packed, weight.absmax, weight.shape[0], weight.blocksize, None,
                               weight.nested_absmax, weight.nested_code, weight.offset, weight.nested_blocksize,
                               gemv_max_m=max(1, A32.shape[0]))
        return dora_ops.weight_norm_from_a_w_t(A, B, a_w_t, w_sq, scaling)
    return dora_ops.weight_norm(A, B, weight.detach(), w_sq, scaling)


def _by_row_blocks(weight: torch.Tensor, rows_fn, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of weight's shape in `dtype`, filled a block of rows at a time from rows_fn(i0, i1) (fp64)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for i0, i1 in row_blocks(*weight.shape):
        out[i0:i1] = rows_fn(i0, i1).to(dtype)
    return out


@torch.no_grad()
def merged(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, g: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:
    """The merged weight g * (W + s B A), each element rounded once from fp64 to `dtype`."""
    def rows(i0, i1):  # (not in place: .double() of an fp64 weight is the weight itself)
        w = weight[i0:i1].double() + scaling * (B[i0:i1].double() @ A.double())
        return w * g[i0:i1, None].double()

    return _by_row_blocks(weight, rows, dtype)


@torch.no_grad()
def unmerged(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, g: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """W = W' / g - s B A from the merged W', each element rounded once from fp64 to `dtype`."""
    def rows(i0, i1):
        return weight[i0:i1].double() / g[i0:i1, None].double() - scaling * (B[i0:i1].double() @ A.double())

    return _by_row_blocks(weight, rows, dtype)


def init_magnitude(weight: Union[torch.Tensor, NF4Weight], A: torch.Tensor, B: torch.Tensor, scaling: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """m at initialisation: ||W + s B A|| per row, as PEFT (= ||W_i|| with the default zero B)."""
    return weight_norm(weight, A, B, scaling).to(dtype)
