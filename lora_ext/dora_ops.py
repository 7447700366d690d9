"""DoRA's operators (csrc/dora; schemas in csrc/ops.cpp): wrappers, fake kernels and autograd.

Each takes g = m / ||W + s B A|| (fp32, the norm detached) and computes y = g (x W^T + s x A^T B^T) + bias
with the scale and bias in the LoRA kernel's epilogue, one rounding. Its gradient in g reaches m through
that division. The layer ops keep x W^T (base_out) for dg: dg_j = sum_i dy_ij (x W'^T)_ij.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops
from ._library import HAS_C, require_compiled
from .nf4 import NF4Weight, check_nf4_linear_args


def dora_forward(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, g: torch.Tensor,
                 bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """g * (base_out + scale x A^T B^T) + bias, differentiable in x, base_out, A, B, g and bias."""
    require_compiled("dora_forward")
    return torch.ops.lora_ext.dora_forward(x, base_out, A, B, g, bias, float(scale))[0]


def dora_layer(x: torch.Tensor, weight, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
               g: torch.Tensor, scale: float) -> torch.Tensor:
    """The DoRA layer over a frozen dense or NF4 weight as one autograd node (differentiable in x, A, B, g)."""
    if isinstance(weight, NF4Weight):
        require_compiled("dora_nf4_linear")
        check_nf4_linear_args(x, weight)
        return torch.ops.lora_ext.dora_nf4_linear(x, weight.packed, weight.absmax, weight.shape[0], weight.blocksize,
                                                  bias, weight.nested_absmax, weight.nested_code, weight.offset,
                                                  weight.nested_blocksize, A, B, g, float(scale))[0]
    require_compiled("dora_linear")
    return torch.ops.lora_ext.dora_linear(x, weight, bias, A, B, g, float(scale))[0]


def a_times_w_t(A: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A W^T (r x out) in fp32 (fp64 if either is fp64) for a dense weight in any float dtype, without a
    weight-sized temporary: DoRA's weight norm."""
    require_compiled("dora_a_times_w_t")
    return torch.ops.lora_ext.dora_a_times_w_t(A, weight)


def weight_norm(A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor, w_sq: torch.Tensor,
                scale: float) -> torch.Tensor:
    """||W + s B A|| per row (fp32) of a dense weight, given ||W_i||^2, without an out x in matrix:
    dora_weight_norm. No autograd (the norm is detached)."""
    require_compiled("dora_weight_norm")
    return torch.ops.lora_ext.dora_weight_norm(A, B, weight, w_sq, float(scale))


def weight_norm_from_a_w_t(A: torch.Tensor, B: torch.Tensor, a_w_t: torch.Tensor, w_sq: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """The same from A W^T (r x out) computed elsewhere (an NF4 weight's): dora_weight_norm_from_a_w_t."""
    require_compiled("dora_weight_norm_from_a_w_t")
    return torch.ops.lora_ext.dora_weight_norm_from_a_w_t(A, B, a_w_t, w_sq, float(scale))


def _scaled_grad(grad_y: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * dy in `dtype`, computed in fp32 and rounded once: the dora_scaled_grad op, which has no autograd, so
    a backward with create_graph=True (grad mode on) takes the differentiable form."""
    if torch.is_grad_enabled() or grad_y.dtype != dtype:
        return (grad_y * g).to(dtype)
    return torch.ops.lora_ext.dora_scaled_grad(grad_y, g)


if HAS_C:
    def _check_columns(op, v, n, what):
        torch._check(v.dim() == 1 and v.shape[0] == n and v.is_floating_point(),
                     lambda: f"{op}: {what} must be a floating-point vector of the {n} output features, got "
                             f"{v.dtype} of shape {tuple(v.shape)}")

    @torch.library.register_fake("lora_ext::dora_forward")
    def _dora_forward_fake(x, base_out, A, B, g, bias, scale):
        ops._check_one_device("dora_forward", x, base_out, A, B, g, bias)
        y, T = ops._lora_forward_fake(x, base_out, A, B, scale, 0.0, 0)
        _check_columns("dora_forward", g, B.shape[0], "g (magnitude / weight norm)")
        if bias is not None:
            _check_columns("dora_forward", bias, B.shape[0], "bias")
        return y, T

    @torch.library.register_fake("lora_ext::dora_backward")
    def _dora_backward_fake(grad_y, x, base_out, T, A, B, g, scale, grad_x_base=None):
        ops._check_one_device("dora_backward", grad_y, x, base_out, T, A, B, g, grad_x_base)
        ops._check_t_dtype("dora_backward", T, A)
        return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape), g.new_empty(g.shape)

    @torch.library.register_fake("lora_ext::dora_a_times_w_t")
    def _dora_a_times_w_t_fake(A, weight):
        ops._check_one_device("dora_a_times_w_t", A, weight)
        torch._check(A.dim() == 2 and weight.dim() == 2 and A.shape[1] == weight.shape[1],
                     lambda: f"dora_a_times_w_t: lora_A must be (r, in_features) and the weight (out_features, "
                             f"in_features), got {tuple(A.shape)} and {tuple(weight.shape)}")
        torch._check(A.is_floating_point() and weight.is_floating_point(),
                     lambda: f"dora_a_times_w_t: lora_A and the weight must be floating point, got {A.dtype} and "
                             f"{weight.dtype}")
        wide = torch.float64 in (A.dtype, weight.dtype)
        return A.new_empty((A.shape[0], weight.shape[0]), dtype=torch.float64 if wide else torch.float32)

    def _weight_norm_fake(op, A, B, other, other_is_weight, w_sq):
        ops._check_one_device(op, A, B, other, w_sq)
        torch._check(all(t.is_floating_point() for t in (A, B, other, w_sq)),
                     lambda: f"{op}: every argument must be floating point, got {A.dtype}, {B.dtype}, {other.dtype} "
                             f"and {w_sq.dtype}")
        torch._check(A.dim() == 2 and B.dim() == 2 and B.shape[1] == A.shape[0],
                     lambda: f"{op}: lora_A must be (r, in_features) and lora_B (out_features, r), got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        want, what = ((B.shape[0], A.shape[1]), "the weight") if other_is_weight else ((A.shape[0], B.shape[0]),
                                                                                       "a_w_t (A W^T)")
        torch._check(tuple(other.shape) == want, lambda: f"{op}: {what} must be {want}, got {tuple(other.shape)}")
        torch._check(w_sq.dim() == 1 and w_sq.shape[0] == B.shape[0],
                     lambda: f"{op}: w_sq (the squared row norms of W) must be a vector of the {B.shape[0]} output "
                             f"features, got shape {tuple(w_sq.shape)}")
        return A.new_empty((B.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("lora_ext::dora_weight_norm")
    def _dora_weight_norm_fake(A, B, weight, w_sq, scale):
        return _weight_norm_fake("dora_weight_norm", A, B, weight, True, w_sq)

    @torch.library.register_fake("lora_ext::dora_weight_norm_from_a_w_t")
    def _dora_weight_norm_from_a_w_t_fake(A, B, a_w_t, w_sq, scale):
        return _weight_norm_fake("dora_weight_norm_from_a_w_t", A, B, a_w_t, False, w_sq)

    @torch.library.register_fake("lora_ext::dora_scaled_grad")
    def _dora_scaled_grad_fake(grad_y, g):
        ops._check_one_device("dora_scaled_grad", grad_y, g)
        torch._check(grad_y.dim() >= 1 and grad_y.is_floating_point(),
                     lambda: f"dora_scaled_grad: grad_output must be floating point with at least one dimension, got "
                             f"{grad_y.dtype} of shape {tuple(grad_y.shape)}")
        _check_columns("dora_scaled_grad", g, grad_y.shape[-1], "g (magnitude / weight norm)")
        return torch.empty(grad_y.shape, dtype=grad_y.dtype, device=grad_y.device)

    @torch.library.register_fake("lora_ext::dora_linear")
    def _dora_linear_fake(x, weight, bias, A, B, g, scale):
        ops._check_one_device("dora_linear", x, weight, bias, A, B, g)
        ops._check_features("dora_linear", x)
        torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                     lambda: f"dora_linear: weight must be (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
        base = torch.nn.functional.linear(x, weight)  # on fake tensors: the real output dtype, under autocast too
        return (*_dora_forward_fake(x, base, A, B, g, bias, scale), torch.empty_like(base))

    @torch.library.register_fake("lora_ext::dora_nf4_linear")
    def _dora_nf4_linear_fake(x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code, offset,
                              nested_blocksize, A, B, g, scale):
        base = ops._nf4_linear_fake(x, packed, absmax, out_features, blocksize, None, nested_absmax, nested_code,
                                    offset, nested_blocksize)
        return (*_dora_forward_fake(x, base, A, B, g, bias, scale), torch.empty_like(base))

    def _dora_forward_setup(ctx, inputs, output):
        x, base_out, A, B, g, bias, scale = inputs
        ctx.save_for_backward(x, base_out, output[1], A, B, g)
        ctx.scale, ctx.has_bias = scale, bias is not None
        ctx.mark_non_differentiable(output[1])

    def _dora_forward_backward(ctx, grad_y, grad_T):
        x, base_out, T, A, B, g = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dA, dB, dg = torch.ops.lora_ext.dora_backward(grad_y, x, base_out, T, A, B, g, ctx.scale, None)
        d_base = _scaled_grad(grad_y, g, base_out.dtype) if needs[1] else None
        rows = math.prod(grad_y.shape[:-1])  # (-1 is ambiguous when there are no output features)
        d_bias = grad_y.reshape(rows, grad_y.shape[-1]).sum(0) if ctx.has_bias and needs[5] else None
        return (dx if needs[0] else None, d_base, dA if needs[2] else None, dB if needs[3] else None,
                dg if needs[4] else None, d_bias, None)

    torch.library.register_autograd("lora_ext::dora_forward", _dora_forward_backward,
                                    setup_context=_dora_forward_setup)

    # dora_linear and dora_nf4_linear: their autograd is C++ (csrc/dora/dora_layer_autograd.cpp).
