"""LoraLinear: a frozen base (nn.Linear, or NF4Linear for QLoRA) plus a trainable low-rank update,
y = base(x) + s * (dropout(x) A^T) B^T, with A (r x in) and B (out x r) shaped like PEFT's; with
use_dora=True, DoRA's magnitude and direction (lora_ext/dora.py)."""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Union

import torch
from torch import nn

from . import dora, dora_ops, mixed_batch, ops
from .inits import check_init_lora_weights, init_lora_, initialize_  # noqa: F401  (init_lora_: public here too)
from .merge import MergeError, merge_nf4
from .nf4 import NF4Linear, NF4Weight, check_nf4_linear_args, dequantize_nf4, is_conv1d, nf4_linear, quantize_nf4

_SEED_RANGE = 2**62
# LoRA layers by the base weight they wrap: a weight wrapped twice (tied) must not be merged twice.
_WEIGHT_USERS: "dict[int, weakref.WeakSet]" = {}


def _in_out(base: nn.Module) -> tuple:
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (stable at large r)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _dropout_seed(p: float, training: bool) -> tuple[float, int]:
    if p == 0.0 or not training:
        return 0.0, 0
    # Drawn from torch's default generator, so torch.manual_seed makes dropout reproducible.
    return p, int(torch.randint(0, _SEED_RANGE, (1,)).item())


def _layer_op(x: torch.Tensor, weight: Union[torch.Tensor, NF4Weight], bias: Optional[torch.Tensor],
              lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float, seed: int) -> torch.Tensor:
    """Base and LoRA branch as one operator over a frozen weight: its backward writes dx once."""
    if isinstance(weight, NF4Weight):
        check_nf4_linear_args(x, weight)
        return ops.lora_nf4_linear(x, weight.packed, weight.absmax, weight.shape[0], weight.blocksize, bias,
                                   weight.nested_absmax, weight.nested_code, weight.offset, weight.nested_blocksize,
                                   lora_A, lora_B, scaling, p, seed)
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed)


def lora_linear(x: torch.Tensor, weight: Union[torch.Tensor, NF4Weight], lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: Optional[torch.Tensor] = None, dropout: float = 0.0,
                training: bool = True) -> torch.Tensor:
    """Functional LoRA linear: base x W^T (+ bias) with W dense or NF4, plus the low-rank update. A dense
    W or a bias that requires grad gets its gradient (the base then runs as its own autograd node)."""
    p, seed = _dropout_seed(dropout, training)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in (weight, bias)):
        out_features = weight.shape[0]
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
            raise RuntimeError(f"lora_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if isinstance(weight, NF4Weight):
            base = nf4_linear(x, weight, bias)
        else:
            base = torch.nn.functional.linear(x, weight, bias)
        return ops.lora_forward(x, base, lora_A, lora_B, scaling, p, seed)
    return _layer_op(x, weight, bias, lora_A, lora_B, scaling, p, seed)


def _check_finite_merge(merged: torch.Tensor, safe_merge: bool) -> None:
    """safe_merge: refuse a merged weight with NaN or Inf before it replaces the base's."""
    if safe_merge and not torch.isfinite(merged).all():
        raise ValueError("LoraLinear.merge(safe_merge=True): the merged weight has NaN or Inf; "
                         "the base weight was left unchanged")


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(f"_global{h}" for h in _HOOKS)


def runs_as_one_op(base: nn.Module) -> bool:
    """Whether LoraLinear may compute `base` itself, inside its one operator: only when base's forward
    is exactly x W^T + b, that is a frozen nn.Linear or NF4Linear (not a subclass) whose forward nobody
    hooks or patches (accelerate's offload hooks patch the instance's forward)."""
    if type(base) not in (nn.Linear, NF4Linear) or "forward" in base.__dict__:
        return False
    if any(getattr(base, h) for h in _HOOKS) or any(getattr(nn.modules.module, h, None) for h in _GLOBAL_HOOKS):
        return False
    return not any(t.requires_grad for t in base.parameters())


class LoraLinear(nn.Module):
    """PEFT-style LoRA layer over a frozen nn.Linear or NF4Linear (kept as `base_layer`)."""

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 adapter_dtype: torch.dtype = torch.float32, loftq_config: Optional[dict] = None,
                 use_dora: bool = False):
        super().__init__()
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
        if not isinstance(base, (nn.Linear, NF4Linear)) and not is_conv1d(base):
            raise TypeError(f"LoraLinear wraps an nn.Linear, an NF4Linear or a Hugging Face Conv1D, "
                            f"got {type(base).__name__}")
        in_f, out_f = _in_out(base)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1 or r > min(in_f, out_f):
            raise ValueError(f"r must be an integer in [1, min(in_features, out_features)] = [1, {min(in_f, out_f)}], "
                             f"got {r!r}")
        if not lora_alpha >= 0:
            raise ValueError(f"lora_alpha must be >= 0, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        check_init_lora_weights(init_lora_weights, loftq_config, base)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_f, r, dtype=adapter_dtype, device=device))
        self.merged = False
        self._trainable = True  # what an adapter set into an empty layer gets (clear_adapter)
        self.disabled = False  # LoraModel.disable_adapter(): the base alone
        self.merge_error = None  # set by merge() over an NF4 base: what the 4-bit requantization lost
        self._unmerged_qweight: Optional[NF4Weight] = None
        # pissa/olora/loftq may change the base (loftq replaces it by an NF4Linear): freeze and register the final
        # one, and leave the module passed in as it was if initialisation fails.
        initialize_(self, init_lora_weights, loftq_config)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        # DoRA: m = ||W + s B A|| per output row at initialisation (PEFT's lora_magnitude_vector).
        self.use_dora = use_dora
        self._dora_w_sq = None  # (the weight's dora.Fingerprint, ||W_i||^2): a constant of the frozen base
        self._dora_merge_norm = None  # ||W + s B A|| of the unmerged weight, kept for unmerge (as PEFT)
        magnitude = None
        if use_dora:
            magnitude = nn.Parameter(dora.init_magnitude(self._base_weight(), self.lora_A, self.lora_B, self.scaling,
                                                         adapter_dtype))
        self.register_parameter("lora_magnitude_vector", magnitude)
        _WEIGHT_USERS.setdefault(id(self.base_layer.weight), weakref.WeakSet()).add(self)

    def set_adapter_weights(self, A: torch.Tensor, B: torch.Tensor, lora_alpha: float, use_rslora: bool,
                            lora_dropout: float) -> tuple:
        """Make (A, B) this layer's adapter (another adapter's, possibly of another rank) and return the
        previous (lora_A, lora_B) parameters, (None, None) if it had none. Used by LoraModel.set_adapter;
        nothing is copied."""
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"adapter weights must be (r, {self.in_features}) and ({self.out_features}, r), "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        if self.merged:
            raise RuntimeError("set_adapter_weights: the current adapter is merged; unmerge it first")
        old = (self.lora_A, self.lora_B)
        trainable = self._trainable if self.lora_A is None else self.lora_A.requires_grad
        self.lora_A = A if isinstance(A, nn.Parameter) else nn.Parameter(A, requires_grad=trainable)
        self.lora_B = B if isinstance(B, nn.Parameter) else nn.Parameter(B, requires_grad=trainable)
        self.r, self.lora_alpha, self.use_rslora, self.lora_dropout = r, lora_alpha, use_rslora, float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        return old

    def set_magnitude(self, magnitude: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
        """Make `magnitude` (out_features,) this layer's DoRA magnitude, None for plain LoRA, and return the
        previous one: with set_adapter_weights, how LoraModel swaps a DoRA adapter in. Nothing is copied."""
        if self.merged:
            raise RuntimeError("set_magnitude: the current adapter is merged; unmerge it first")
        if magnitude is not None and tuple(magnitude.shape) != (self.out_features,):
            raise ValueError(f"a DoRA magnitude must have shape ({self.out_features},), got {tuple(magnitude.shape)}")
        old = self.lora_magnitude_vector
        if magnitude is not None and not isinstance(magnitude, nn.Parameter):
            trainable = self.lora_A.requires_grad if self.lora_A is not None else self._trainable
            magnitude = nn.Parameter(magnitude, requires_grad=trainable)
        self.lora_magnitude_vector = magnitude
        self.use_dora = magnitude is not None
        return old

    def set_trainable(self, trainable: bool) -> None:
        """The adapter's tensors (A, B, DoRA's magnitude) trainable or frozen, and what one set in later gets."""
        for t in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if t is not None:
                t.requires_grad_(trainable)
        self._trainable = trainable

    def clear_adapter(self) -> tuple:
        """No adapter here (the active one does not target this layer, when a model's adapters target
        different modules): the layer runs its base alone. Returns the previous (lora_A, lora_B)."""
        if self.merged:
            raise RuntimeError("clear_adapter: the current adapter is merged; unmerge it first")
        old = (self.lora_A, self.lora_B)
        if self.lora_A is not None:
            self._trainable = self.lora_A.requires_grad
        self.lora_A = self.lora_B = None
        self.set_magnitude(None)
        self.r, self.lora_alpha, self.scaling = 0, 0.0, 0.0
        return old

    @classmethod
    def without_adapter(cls, base: nn.Module) -> "LoraLinear":
        """A layer over `base` that holds no adapter yet (LoraModel.load_adapter of an adapter whose targets
        the active one lacks)."""
        layer = cls(base, r=1, lora_alpha=1)
        layer.clear_adapter()
        return layer

    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        init_lora_(self.lora_A, self.lora_B, init_lora_weights)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if getattr(self, "_unmerged_qweight", None) is not None:  # unmerge() restores it where the layer is now
            self._unmerged_qweight = self._unmerged_qweight.to(self.base_layer.weight.device)
        return self

    def _tied_with(self) -> list:
        users = _WEIGHT_USERS.get(id(self.base_layer.weight), ())
        return [m for m in users if m is not self and m.base_layer.weight is self.base_layer.weight]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold s * B @ A into the base weight. Dense: in place, fp64 delta, W rounded once. NF4: a new
        4-bit weight (the original is kept, so unmerge() restores it exactly); merge_error says what the
        requantization lost. safe_merge checks the result is finite first and leaves W as it was if not."""
        if self.merged:
            warnings.warn("LoraLinear.merge: already merged; nothing to do", UserWarning, stacklevel=2)
            return
        if self.lora_A is None:
            return  # no adapter in this layer: nothing to fold in
        self.check_mergeable()
        base = self.base_layer
        if self.use_dora:
            self._merge_dora(safe_merge)
        elif isinstance(base, NF4Linear):
            new, err = merge_nf4(base.qweight, self.lora_A, self.lora_B, self.scaling)
            _check_finite_merge(new.dequantize(new.dtype), safe_merge)  # (finite in fp32 may be Inf in fp16)
            self._unmerged_qweight = base.qweight
            base._set_weight(new)
            self.merge_error = err
        elif safe_merge or is_conv1d(base):
            merged = self._weight_out_in().clone()
            ops.merge_lora_(merged, self.lora_A, self.lora_B, self.scaling)
            _check_finite_merge(merged, safe_merge)
            self._set_weight_out_in(merged)
        else:
            ops.merge_lora_(base.weight.data, self.lora_A, self.lora_B, self.scaling)
        self._dora_w_sq = None  # (the writes above go through .data, which the fingerprint does not see)
        self.merged = True

    def check_mergeable(self) -> None:
        """What merge() refuses whatever the numbers: a model checks every layer before it merges the first."""
        if self._tied_with():
            raise RuntimeError("LoraLinear.merge: the base weight is shared with another LoRA layer (tied weights); "
                               "merging would apply the update to both. Untie the weights or merge one copy.")
        base = self.base_layer
        if not isinstance(base, NF4Linear) and torch._debug_has_internal_overlap(base.weight) != 0:
            raise RuntimeError("LoraLinear.merge: the base weight's elements share memory (an expanded view), so "
                               "it cannot take a merged update in place; give the base a weight of its own "
                               "(base.weight.data = base.weight.data.clone())")

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight.detach()
        return w.t().contiguous() if is_conv1d(self.base_layer) else w

    def _set_weight_out_in(self, w: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(w.t() if is_conv1d(self.base_layer) else w)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out again: dense W -= s * B @ A (within one rounding of the original);
        NF4: the original packed weight is restored bit for bit."""
        if not self.merged:
            warnings.warn("LoraLinear.unmerge: not merged; nothing to do", UserWarning, stacklevel=2)
            return
        base = self.base_layer
        if isinstance(base, NF4Linear):
            base._set_weight(self._unmerged_qweight)
            self._unmerged_qweight, self.merge_error = None, None
        elif self.use_dora:
            w = self._weight_out_in()
            g = self.lora_magnitude_vector.detach().float() / self._dora_merge_norm
            self._set_weight_out_in(dora.unmerged(w, self.lora_A, self.lora_B, self.scaling, g, w.dtype))
        elif is_conv1d(base):
            w = self._weight_out_in().clone()
            ops.unmerge_lora_(w, self.lora_A, self.lora_B, self.scaling)
            self._set_weight_out_in(w)
        else:
            ops.unmerge_lora_(base.weight.data, self.lora_A, self.lora_B, self.scaling)
        self._dora_merge_norm = None
        self._dora_w_sq = None
        self.merged = False

    def _base_weight(self) -> Union[torch.Tensor, NF4Weight]:
        """The frozen weight as out x in: dense (a transposed view for Conv1D) or the NF4Weight."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            return base.qweight
        return base.weight.detach().t() if is_conv1d(base) else base.weight.detach()

    def dora_weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row (fp32, detached), ||W_i||^2 cached while the base weight is unchanged
        (dora.Fingerprint: writes through `.data` are not seen; merge and unmerge drop it); inside
        dora.dora_caching() with grad off, the norm too while A and B are unchanged as well. Under torch.compile
        ||W_i||^2 is taken at every forward: a traced graph cannot compare a weight with the one cached."""
        weight = self._base_weight()
        w_key = None
        if not torch.compiler.is_compiling():
            w_key = dora.fingerprint(self.base_layer.weight)  # (NF4: the packed codes' parameter)
            if w_key is not None and (self._dora_w_sq is None or self._dora_w_sq[0] != w_key):
                self._dora_w_sq = (w_key, dora.row_norms_squared(weight))
        w_sq = self._dora_w_sq[1] if w_key is not None else dora.row_norms_squared(weight)
        norms, key = dora.active_norm_cache(), None  # (no cache while compiling)
        if norms is not None and w_key is not None:
            a_key, b_key = dora.fingerprint(self.lora_A), dora.fingerprint(self.lora_B)
            key = None if a_key is None or b_key is None else (w_key, a_key, b_key, self.scaling)
        if key is not None and self in norms and norms[self][0] == key:
            return norms[self][1]
        norm = dora.weight_norm(weight, self.lora_A, self.lora_B, self.scaling, w_sq)
        if key is not None:
            norms[self] = (key, norm)
        return norm

    def _base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias (PEFT's base product on the dropped-out x)."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            return nf4_linear(x, base.qweight)
        if is_conv1d(base):
            return torch.matmul(x, base.weight.to(x.dtype))
        return nn.functional.linear(x, base.weight)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # g stays fp32 (PEFT's): in fp16 an m / ||W + s B A|| past 65504 would be Inf, and Inf * 0 NaN. The products
        # below are taken in fp32 and rounded once to the output's dtype (which autocast decides).
        g = self.lora_magnitude_vector / self.dora_weight_norm()
        bias = base.bias_for(x) if isinstance(base, NF4Linear) else base.bias
        p, seed = _dropout_seed(self.lora_dropout, self.training)
        if p == 0.0:
            # g * (x W^T + s x A^T B^T) + bias: one operator, g and the bias in the LoRA kernel's epilogue
            if runs_as_one_op(base):
                weight = base.qweight if isinstance(base, NF4Linear) else base.weight
                return dora_ops.dora_layer(x, weight, bias, self.lora_A, self.lora_B, g, self.scaling)
            out = base(x)
            return dora_ops.dora_forward(x, out - bias.to(out.dtype) if bias is not None else out, self.lora_A,
                                         self.lora_B, g, bias, self.scaling)
        # PEFT: base(x) + (g - 1) xd W^T + g s xd A^T B^T, xd the dropped-out x, summed as PEFT does (grouped as
        # g (xd W^T + s xd A^T B^T) - xd W^T, an Inf input gave NaN where PEFT's sum is Inf)
        xd = ops.lora_dropout(x, p, seed)
        bl = self._base_linear(xd)
        out = base(x)
        lora = ops.lora_forward(xd, bl.new_zeros(()).expand(bl.shape), self.lora_A, self.lora_B, self.scaling, 0.0, 0)
        return (out + (g - 1) * bl + g * lora).to(out.dtype)

    @torch.no_grad()
    def _merge_dora(self, safe_merge: bool) -> None:
        """W' = g * (W + s B A), g = m / ||W + s B A|| of the unmerged W, each row rounded once from fp64; an NF4
        base is requantized (the original kept for unmerge) and merge_error set."""
        norm = self.dora_weight_norm()
        g = self.lora_magnitude_vector.detach().float() / norm
        base = self.base_layer
        if isinstance(base, NF4Linear):
            old = base.qweight
            w = old.dequantize(torch.float32)
            merged = dora.merged(w, self.lora_A, self.lora_B, self.scaling, g, torch.float32)
            source = merged.to(old.dtype)  # (what is quantized: finite in fp32 may be Inf in fp16)
            _check_finite_merge(source, safe_merge)
            new = quantize_nf4(source, old.blocksize, old.double_quant, old.quant_storage)
            err = dequantize_nf4(new, torch.float32).double() - merged.double()
            change = (merged.double() - w.double()).norm().item()
            self.merge_error = MergeError(err.abs().max().item() if err.numel() else 0.0,
                                          err.norm().item() / change if change > 0 else 0.0)
            self._unmerged_qweight = old
            base._set_weight(new)
        else:
            w = self._weight_out_in()
            if not w.is_floating_point():  # (W' rounded to w.dtype would truncate it to integers)
                raise TypeError(f"LoraLinear.merge: the base weight must be floating point, got {w.dtype}")
            merged = dora.merged(w, self.lora_A, self.lora_B, self.scaling, g, w.dtype)
            _check_finite_merge(merged, safe_merge)
            self._set_weight_out_in(merged)
        self._dora_merge_norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.disabled:
            return base(x)
        batch = mixed_batch.current()
        if batch is not None:  # LoraModel(..., adapter_names=[...]): an adapter per row
            return batch.lora_forward(self, x)
        if self.merged or self.lora_A is None:
            return base(x)
        if self.use_dora:
            return self._dora_forward(x)
        if runs_as_one_op(base):
            p, seed = _dropout_seed(self.lora_dropout, self.training)
            if isinstance(base, NF4Linear):
                return _layer_op(x, base.qweight, base.bias_for(x), self.lora_A, self.lora_B, self.scaling, p, seed)
            return _layer_op(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, p, seed)
        base_out = base(x)
        p, seed = _dropout_seed(self.lora_dropout, self.training)
        return ops.lora_forward(x, base_out, self.lora_A, self.lora_B, self.scaling, p, seed)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}"
                + (", use_dora=True" if self.use_dora else ""))
