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


def _check_one_device(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """The kernels take every tensor on one device. A fake kernel must refuse a mix too: one meta tensor
    among CPU ones sends the whole call to it, and it would return without computing anything."""
    devices = sorted({str(t.device) for t in tensors if t is not None})
    torch._check(len(devices) <= 1, lambda: f"{op}: all tensors must be on one device, got {devices}")


def _check_shape(op: str, shape: Sequence[int]) -> None:
    torch._check(all(s >= 0 for s in shape), lambda: f"{op}: shape must have non-negative sizes, got {list(shape)}")


def _check_features(op: str, x: torch.Tensor, what: str = "input") -> None:
    """x has a last dimension (features) to read: a 0-dim x must be refused before x.shape[-1]."""
    torch._check(x.dim() >= 1, lambda: f"{op}: {what} must have at least one dimension, got a scalar")


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


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int, blocksize: int,
               bias: Optional[torch.Tensor] = None, nested_absmax: Optional[torch.Tensor] = None,
               nested_code: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
               nested_blocksize: int = 256, gemv_max_m: int = -1) -> torch.Tensor:
    """y = x @ W.T (+ bias) with W in NF4; differentiable with respect to x and bias."""
    require_compiled("nf4_linear")
    return torch.ops.lora_ext.nf4_linear(x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                         nested_code, offset, nested_blocksize, gemv_max_m)


def lora_forward(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                 dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """base_out + scale * dropout(x) A^T B^T, differentiable in x, base_out, A and B."""
    require_compiled("lora_forward")
    return torch.ops.lora_ext.lora_forward(x, base_out, A, B, float(scale), float(dropout_p), int(seed))[0]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """x W^T (+ bias) + scale * dropout(x) A^T B^T over a frozen W, as one autograd node whose backward
    writes dx once (the base's dy W is the LoRA kernel's addend). Differentiable in x, A and B."""
    require_compiled("lora_linear")
    return torch.ops.lora_ext.lora_linear(x, weight, bias, A, B, float(scale), float(dropout_p), int(seed))[0]


def lora_nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int, blocksize: int,
                    bias: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], nested_blocksize: int,
                    A: torch.Tensor, B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                    seed: int = 0) -> torch.Tensor:
    """lora_linear over an NF4 base (nf4_linear's arguments, then the adapter's)."""
    require_compiled("lora_nf4_linear")
    return torch.ops.lora_ext.lora_nf4_linear(x, packed, absmax, out_features, blocksize, bias, nested_absmax,
                                              nested_code, offset, nested_blocksize, A, B, float(scale),
                                              float(dropout_p), int(seed))[0]


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    require_compiled("lora_dropout")
    return torch.ops.lora_ext.lora_dropout(x, float(p), int(seed))


def merge_lora_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W += scale * B @ A in place: fp64 delta, W rounded once, B @ A never materialized."""
    require_compiled("merge_lora_")
    torch.ops.lora_ext.merge_lora_(W, A, B, float(scale))
    return W


def unmerge_lora_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W -= scale * B @ A in place (the inverse of merge_lora_, to within one rounding)."""
    require_compiled("unmerge_lora_")
    torch.ops.lora_ext.unmerge_lora_(W, A, B, float(scale))
    return W


def multi_lora_forward_(y: torch.Tensor, x: torch.Tensor, lora_A: Sequence[torch.Tensor],
                        lora_B: Sequence[torch.Tensor], scales: Sequence[float], rows: torch.Tensor,
                        tiles: torch.Tensor) -> torch.Tensor:
    """y += each row's adapter update in place (csrc/ops.cpp says the plan's layout); returns y."""
    require_compiled("multi_lora_forward_")
    torch.ops.lora_ext.multi_lora_forward_(y, x, list(lora_A), list(lora_B), [float(s) for s in scales], rows, tiles)
    return y


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
        _check_one_device("double_quant", absmax, code)
        torch._check(absmax.dtype == torch.float32, lambda: f"double_quant: absmax must be float32, got {absmax.dtype}")
        torch._check(code.numel() == 256, lambda: f"double_quant: code must have 256 entries, got {code.numel()}")
        torch._check(_valid_blocksize(blocksize),
                     lambda: f"double_quant: blocksize must be a power of two in [32, 4096], got {blocksize}")
        n = absmax.numel()
        return (absmax.new_empty((n,), dtype=torch.uint8),
                absmax.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32),
                absmax.new_empty((), dtype=torch.float32))

    @torch.library.register_fake("lora_ext::dequantize_nf4")
    def _dequantize_nf4_fake(packed, absmax, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
                             offset=None, nested_blocksize=256):
        n = math.prod(shape)
        _check_one_device("dequantize_nf4", packed, absmax, nested_absmax, nested_code, offset)
        _check_shape("dequantize_nf4", shape)
        torch._check(_valid_blocksize(blocksize), lambda: f"blocksize must be a power of two in [32, 4096], got {blocksize}")
        torch._check(dtype in _FLOAT_TYPES, lambda: f"dequantize_nf4: dtype must be float32/float16/bfloat16, got {dtype}")
        torch._check(packed.dtype == torch.uint8, lambda: f"dequantize_nf4: packed weight must be uint8, got {packed.dtype}")
        torch._check(packed.numel() == (n + 1) // 2,
                     lambda: f"dequantize_nf4: packed weight must have {(n + 1) // 2} elements, got {packed.numel()}")
        torch._check(absmax.numel() == (n + blocksize - 1) // blocksize,
                     lambda: "dequantize_nf4: absmax must have one entry per block")
        return packed.new_empty(tuple(shape), dtype=dtype)

    @torch.library.register_fake("lora_ext::dequantize_nf4_out")
    def _dequantize_nf4_out_fake(packed, absmax, blocksize, out, nested_absmax=None, nested_code=None, offset=None,
                                 nested_blocksize=256):
        _check_one_device("dequantize_nf4_out", packed, absmax, out, nested_absmax, nested_code, offset)
        torch._check(out.dtype in _FLOAT_TYPES, lambda: f"dequantize_nf4_out: out must be float32/float16/bfloat16, got {out.dtype}")
        torch._check(packed.numel() == (out.numel() + 1) // 2,
                     lambda: f"dequantize_nf4_out: packed weight must have {(out.numel() + 1) // 2} elements, got {packed.numel()}")
        return None

    @torch.library.register_fake("lora_ext::nf4_linear")
    def _nf4_linear_fake(x, packed, absmax, out_features, blocksize, bias=None, nested_absmax=None, nested_code=None,
                         offset=None, nested_blocksize=256, gemv_max_m=-1):
        _check_one_device("nf4_linear", x, packed, absmax, bias, nested_absmax, nested_code, offset)
        torch._check(x.dtype in (*_FLOAT_TYPES, torch.float64),  # float64: gradcheck, as the kernels
                     lambda: f"nf4_linear: input must be float32/float16/bfloat16 (or float64), got {x.dtype}")
        _check_features("nf4_linear", x)
        torch._check(out_features >= 0, lambda: f"nf4_linear: out_features must be >= 0, got {out_features}")
        torch._check(packed.numel() == (out_features * x.shape[-1] + 1) // 2,
                     lambda: f"nf4_linear: packed weight must hold {out_features} x {x.shape[-1]} codes")
        torch._check(bias is None or (bias.dim() == 1 and bias.shape[0] == out_features),
                     lambda: f"nf4_linear: bias must have shape ({out_features},)")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("lora_ext::nf4_linear_grad_input")
    def _nf4_linear_grad_input_fake(grad_out, packed, absmax, in_features, blocksize, nested_absmax=None,
                                    nested_code=None, offset=None, nested_blocksize=256):
        _check_one_device("nf4_linear_grad_input", grad_out, packed, absmax, nested_absmax, nested_code, offset)
        _check_features("nf4_linear_grad_input", grad_out, "grad_output")
        torch._check(in_features >= 0, lambda: f"nf4_linear_grad_input: in_features must be >= 0, got {in_features}")
        torch._check(packed.numel() == (grad_out.shape[-1] * in_features + 1) // 2,
                     lambda: "nf4_linear_grad_input: packed weight does not match grad_output and in_features")
        return grad_out.new_empty((*grad_out.shape[:-1], in_features))

    def _nf4_linear_setup(ctx, inputs, output):
        x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code, offset, nbs, _ = inputs
        # Only the packed weight and its quant state are kept: no activation, nothing dequantized.
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
        ctx.in_features, ctx.blocksize, ctx.nested_blocksize = x.shape[-1], blocksize, nbs
        ctx.has_bias = bias is not None

    def _nf4_linear_backward(ctx, grad):
        packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.lora_ext.nf4_linear_grad_input(grad, packed, absmax, ctx.in_features, ctx.blocksize,
                                                             nested_absmax, nested_code, offset, ctx.nested_blocksize)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0)  # (-1, 0): ambiguous
        return grad_x, None, None, None, None, grad_bias, None, None, None, None, None

    torch.library.register_autograd("lora_ext::nf4_linear", _nf4_linear_backward, setup_context=_nf4_linear_setup)

    @torch.library.register_fake("lora_ext::lora_dropout")
    def _lora_dropout_fake(x, p, seed):
        torch._check(0.0 <= p < 1.0, lambda: f"lora_dropout: p must be in [0, 1), got {p}")
        return torch.empty_like(x)

    @torch.library.register_fake("lora_ext::lora_forward")
    def _lora_forward_fake(x, base_out, A, B, scale, dropout_p, seed):
        _check_one_device("lora_forward", x, base_out, A, B)
        _check_features("lora_forward", x)
        torch._check(A.dim() == 2 and A.shape[1] == x.shape[-1],
                     lambda: f"lora_forward: lora_A must be (r, {x.shape[-1]}), got {tuple(A.shape)}")
        torch._check(B.dim() == 2 and B.shape[1] == A.shape[0],
                     lambda: f"lora_forward: lora_B must be (out_features, {A.shape[0]}), got {tuple(B.shape)}")
        torch._check(base_out.dim() == x.dim() and base_out.shape[-1] == B.shape[0],
                     lambda: f"lora_forward: base output must have the input's leading dims and {B.shape[0]} features, "
                             f"got {tuple(base_out.shape)} for input {tuple(x.shape)}")
        m = math.prod(x.shape[:-1])  # T has a row per row of x, also when x has no features
        return torch.empty_like(base_out), A.new_empty((m, A.shape[0]))

    @torch.library.register_fake("lora_ext::lora_backward")
    def _lora_backward_fake(grad_y, x, T, A, B, scale, dropout_p, seed, grad_x_base=None):
        _check_one_device("lora_backward", grad_y, x, T, A, B, grad_x_base)
        torch._check(grad_x_base is None or grad_x_base.numel() == x.numel(),
                     lambda: f"lora_backward: grad_x_base must have the input's {x.numel()} elements")
        _check_t_dtype("lora_backward", T, A)
        return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape)  # contiguous, as the kernels'

    def _check_t_dtype(op, T, A):
        torch._check(T.dtype == A.dtype,
                     lambda: f"{op}: T must be in lora_A's dtype (the forward's T), got {T.dtype} for {A.dtype}")

    @torch.library.register_fake("lora_ext::lora_linear")
    def _lora_linear_fake(x, weight, bias, A, B, scale, dropout_p, seed):
        _check_one_device("lora_linear", x, weight, bias, A, B)
        _check_features("lora_linear", x)
        torch._check(x.dtype in (*_FLOAT_TYPES, torch.float64),
                     lambda: f"lora_linear: input must be float32, float16, bfloat16 or float64, got {x.dtype}")
        torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                     lambda: f"lora_linear: weight must be (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
        n = weight.shape[0]
        torch._check(bias is None or (bias.dim() == 1 and bias.shape[0] == n and bias.is_floating_point()),
                     lambda: f"lora_linear: bias must be floating point of shape ({n},), got {bias.dtype} of shape "
                             f"{tuple(bias.shape)}")
        # linear on fake tensors: the real kernel's output dtype, under autocast too
        return _lora_forward_fake(x, torch.nn.functional.linear(x, weight, bias), A, B, scale, dropout_p, seed)

    @torch.library.register_fake("lora_ext::lora_nf4_linear")
    def _lora_nf4_linear_fake(x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code, offset,
                              nested_blocksize, A, B, scale, dropout_p, seed):
        base = _nf4_linear_fake(x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code, offset,
                                nested_blocksize)
        return _lora_forward_fake(x, base, A, B, scale, dropout_p, seed)

    # Every op with a LoRA branch has inputs x, ..., A, B, scale, dropout_p, seed and outputs (y, T).
    # Saved: x (the base layer keeps it anyway), T, A, B, and references to what the op's base
    # gradient reads; the dropout mask is regenerated from seed.
    def _branch_setup(ctx, x, A, B, scale, dropout_p, seed, T, base_saved=()):
        ctx.save_for_backward(x, T, A, B, *base_saved)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        ctx.mark_non_differentiable(T)

    def _branch_grads(ctx, saved, grad_y, grad_x_base, n_inputs):
        """The gradients of the op's n_inputs inputs: x first, A and B fifth and fourth from last.
        saved: ctx.saved_tensors, unpacked once (checkpointing allows one unpack)."""
        x, T, A, B = saved[:4]
        grad_x, grad_A, grad_B = torch.ops.lora_ext.lora_backward(grad_y, x, T, A, B, ctx.scale, ctx.dropout_p,
                                                                  ctx.seed, grad_x_base)
        needs = ctx.needs_input_grad
        grads = [None] * n_inputs
        grads[0] = grad_x if needs[0] else None
        grads[-5] = grad_A if needs[-5] else None
        grads[-4] = grad_B if needs[-4] else None
        return grads

    def _lora_forward_setup(ctx, inputs, output):
        x, base_out, A, B, scale, dropout_p, seed = inputs
        _branch_setup(ctx, x, A, B, scale, dropout_p, seed, output[1])

    def _lora_forward_backward(ctx, grad_y, grad_T):
        grads = _branch_grads(ctx, ctx.saved_tensors, grad_y, None, 7)
        grads[1] = grad_y if ctx.needs_input_grad[1] else None  # y = base_out + ...
        return tuple(grads)

    torch.library.register_autograd("lora_ext::lora_forward", _lora_forward_backward, setup_context=_lora_forward_setup)

    # lora_linear and lora_nf4_linear: their autograd is C++ (csrc/lora/lora_layer_autograd.cpp).

    def _merge_fake(W, A, B, scale):
        _check_one_device("merge", W, A, B)
        torch._check(W.dim() == 2 and A.dim() == 2 and B.dim() == 2, lambda: "merge: W, A and B must be 2-D")
        torch._check(A.shape[1] == W.shape[1] and B.shape[0] == W.shape[0] and A.shape[0] == B.shape[1],
                     lambda: f"merge: A must be (r, {W.shape[1]}) and B ({W.shape[0]}, r)")
        return None

    torch.library.register_fake("lora_ext::merge_lora_")(_merge_fake)
    torch.library.register_fake("lora_ext::unmerge_lora_")(_merge_fake)

    @torch.library.register_fake("lora_ext::merge_nf4")
    def _merge_nf4_fake(packed, absmax, blocksize, shape, A, B, scale, nested_absmax=None, nested_code=None,
                        offset=None, nested_blocksize=256):
        n = math.prod(shape)
        _check_one_device("merge_nf4", packed, absmax, A, B, nested_absmax, nested_code, offset)
        _check_shape("merge_nf4", shape)
        torch._check(len(shape) == 2, lambda: f"merge_nf4: the NF4 weight must be 2-D, got shape {shape}")
        torch._check(_valid_blocksize(blocksize),
                     lambda: f"merge_nf4: blocksize must be a power of two in [32, 4096], got {blocksize}")
        return (packed.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
                packed.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))

    @torch.library.register_fake("lora_ext::multi_lora_forward_")
    def _multi_lora_forward_fake(y, x, lora_A, lora_B, scales, rows, tiles):
        _check_one_device("multi_lora_forward_", y, x, rows, tiles, *lora_A, *lora_B)
        _check_features("multi_lora_forward_", x)
        _check_features("multi_lora_forward_", y, "output")
        k, n = x.shape[-1], y.shape[-1]
        # The rules of csrc/multi/multi_checks.h that read no values (the plan's values are the CPU's to check).
        floats = (*_FLOAT_TYPES, torch.float64)
        torch._check(x.dtype in floats and y.dtype in floats,
                     lambda: f"multi_lora_forward_: input and output must be float32, float16, bfloat16 or float64, "
                             f"got {x.dtype} and {y.dtype}")
        m = math.prod(x.shape[:-1])
        torch._check(math.prod(y.shape[:-1]) == m,
                     lambda: f"multi_lora_forward_: the output must have a row per row of the input, got "
                             f"{tuple(y.shape)} for input {tuple(x.shape)}")
        torch._check(y.is_contiguous(),
                     lambda: f"multi_lora_forward_: the output is updated in place and must be contiguous, got "
                             f"strides {y.stride()}")
        torch._check(len(lora_A) == len(lora_B) == len(scales),
                     lambda: "multi_lora_forward_: lora_A, lora_B and scales must have one entry per adapter")
        for i, (a, b) in enumerate(zip(lora_A, lora_B)):
            torch._check(a.dim() == 2 and a.shape[1] == k,
                         lambda: f"multi_lora_forward_: lora_A[{i}] must be (r, {k}), got {tuple(a.shape)}")
            torch._check(b.dim() == 2 and b.shape[0] == n and b.shape[1] == a.shape[0],
                         lambda: f"multi_lora_forward_: lora_B[{i}] must be ({n}, {a.shape[0]}), got {tuple(b.shape)}")
            torch._check(a.dtype in floats and b.dtype in floats,
                         lambda: f"multi_lora_forward_: adapter {i} must be floating point, got {a.dtype} and "
                                 f"{b.dtype}")
        torch._check(rows.dim() == 1 and rows.dtype == torch.int64,
                     lambda: f"multi_lora_forward_: rows must be a 1-D int64 tensor, got {rows.dtype}")
        torch._check(rows.numel() <= m, lambda: f"multi_lora_forward_: rows has {rows.numel()} entries for {m} rows")
        torch._check(tiles.dim() == 2 and tiles.shape[1] == 3 and tiles.dtype == torch.int32,
                     lambda: f"multi_lora_forward_: tiles must be int32 of shape (n, 3), got {tiles.dtype}")
        return None
