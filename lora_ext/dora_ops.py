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


def _scaled_grad(grad_y: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * dy in `dtype`, computed in fp32 and rounded once. out= saves the fp32 tensor on CUDA, but autograd
    refuses it, so a backward with create_graph=True (grad mode on) takes the differentiable form. On the CPU
    an fp32 copy scaled in place is the fast form: torch 2.14's CPU mul of a 16-bit dy by an fp32 row vector
    into a new or out= tensor took 1.1 ms for 128 x 3584, the in-place one 0.07 ms (the same bits)."""
    if torch.is_grad_enabled():
        return (grad_y * g).to(dtype)
    if grad_y.device.type == "cpu":
        return grad_y.to(torch.float32, copy=True).mul_(g).to(dtype)
    return torch.mul(grad_y, g, out=torch.empty(grad_y.shape, dtype=dtype, device=grad_y.device))


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
        return torch.empty_like(x), torch.empty_like(A), torch.empty_like(B), torch.empty_like(g)

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
