"""LoRA initialisations, with the numbers of PEFT 0.21.2 (peft/tuners/lora/layer.py, peft/utils/loftq_utils.py):

- True / False / 'gaussian': A and B only (init_lora_).
- 'pissa' / 'pissa_niter_N': A, B from the top-r singular triplets of W (full SVD, or torch.svd_lowrank with N
  subspace iterations), split as PEFT does (S / scaling, square roots on both sides); the base keeps W - s·B·A,
  so the layer's output at init is the base model's.
- 'olora': B, A = the first r columns of Q and rows of R of W = QR; the base keeps W - s·B·A.
- 'loftq': the base is quantized to NF4 by the layer itself, alternating Q = NF4(W - s·B·A) and A, B = top-r SVD of
  W - dequant(Q) (PEFT's loop, with the scaling PEFT leaves out), so A and B capture what 4 bits lost.

to_plain_lora is PEFT's path_initial_model_for_weight_conversion: a trained PiSSA/OLoRA adapter as a plain LoRA
adapter of twice the rank over the original base weight.
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from .nf4 import NF4Linear, NF4Weight, dequantize_nf4, is_conv1d, quantize_nf4

ACCEPTED = "True, False, 'gaussian', 'pissa', 'pissa_niter_N' (N a non-negative integer), 'olora' or 'loftq'"
LOFTQ_CONFIG = "loftq_config={'loftq_bits': 4, 'loftq_iter': N} (N >= 1)"
# LoftQ's quantizer: NF4Linear.from_linear's defaults (uint8 storage).
LOFTQ_BLOCKSIZE, LOFTQ_DOUBLE_QUANT = 64, True
_LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # peft.LoftQConfig's
_NITER = re.compile(r"pissa_niter_(\d+)")


def _kind(value) -> Optional[str]:
    """'plain', 'pissa', 'olora' or 'loftq'; None for a value no init accepts. Only real bools count as True/False:
    0 and 1 would otherwise pass for them."""
    if isinstance(value, bool) or value == "gaussian":
        return "plain"
    if value == "pissa" or (isinstance(value, str) and _NITER.fullmatch(value)):
        return "pissa"
    if value in ("olora", "loftq"):
        return value
    return None


def init_when_loaded(value) -> Union[bool, str]:
    """The init a loaded adapter saved with init_lora_weights=value starts from, before its weights are copied in
    (PEFT's rule): PiSSA and OLoRA are taken again, as their file is meant for the original base, whose top
    they move out of W; any other init is plain, which the loaded weights replace. An adapter meant for the base
    its init left (LoraModel.base_state_dict) says init_lora_weights=True, as PEFT's examples write it."""
    return value if _kind(value) in ("pissa", "olora") else True


def changes_base_when_loaded(value) -> bool:
    return init_when_loaded(value) is not True


def _loftq_settings(loftq_config) -> tuple[int, int]:
    """(bits, iterations) from PEFT's dict or a peft.LoftQConfig; a ValueError saying what is expected otherwise."""
    if not loftq_config:
        raise ValueError(f"init_lora_weights='loftq' needs {LOFTQ_CONFIG}, got loftq_config={loftq_config!r}")
    cfg = loftq_config if isinstance(loftq_config, dict) else vars(loftq_config)
    unknown = sorted(set(cfg) - set(_LOFTQ_DEFAULTS))
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {unknown}; expected {LOFTQ_CONFIG}")
    bits, iters = (cfg.get(k, d) for k, d in _LOFTQ_DEFAULTS.items())
    if bits != 4:
        raise ValueError(f"loftq_bits must be 4 (LoftQ quantizes the base to NF4 here), got {bits!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"loftq_iter must be an integer >= 1, got {iters!r}")
    return bits, iters


def check_init_lora_weights(value, loftq_config=None, base: Optional[nn.Module] = None) -> None:
    """ValueError naming the accepted values for anything else; for 'loftq', also without a valid loftq_config
    or over an NF4Linear base (LoftQ needs the dense weight). base=None checks the value alone.
    A loftq_config beside another init is ignored, as PEFT does (get_peft_model may warn once)."""
    kind = _kind(value)
    if kind is None:
        raise ValueError(f"init_lora_weights must be one of {ACCEPTED}, got {value!r}")
    if kind != "loftq":
        return
    if isinstance(base, NF4Linear):
        raise ValueError("init_lora_weights='loftq' quantizes the dense base weight itself and needs the dense "
                         "nn.Linear or Conv1D, got an NF4Linear (get_peft_model with quantize_base='nf4' leaves LoftQ's "
                         "targets dense until LoftQ quantizes them)")
    _loftq_settings(loftq_config)


def needs_dense_base(value) -> bool:
    """Whether the layer quantizes its own base (LoftQ), so the model must come in dense."""
    return _kind(value) == "loftq"


@torch.no_grad()
def init_lora_(A: torch.Tensor, B: torch.Tensor, init_lora_weights: Union[bool, str] = True) -> None:
    """PEFT's initialisation: True = A kaiming-uniform(a=sqrt(5)), B zeros; 'gaussian' = A ~ N(0, 1/r),
    B zeros; False = both kaiming-uniform (a non-zero update from the start, for tests)."""
    if init_lora_weights == "gaussian":
        nn.init.normal_(A, std=1.0 / A.shape[0])
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


# ---------------------------------------------------------------- the decompositions (fp32, (out, in) weights)


def _top_r(w: torch.Tensor, r: int, niter: Optional[int] = None) -> tuple:
    """U_r (out, r), S_r (r), Vh_r (r, in): full SVD, or torch.svd_lowrank's randomised one (draws from
    torch's generator, as PEFT's does, so a seed reproduces PEFT's numbers)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
    return U, S, V.t()


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple:
    """A, B with s·B·A = U diag(S) Vh: PiSSA's split, the singular values divided by the scaling and their square
    roots put on both sides (products with a diagonal are exact, so this equals PEFT's diag() matmuls bit for bit)."""
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root


def _pissa(w: torch.Tensor, r: int, scaling: float, value: str) -> tuple:
    niter = _NITER.fullmatch(value)
    return _split(*_top_r(w, r, None if niter is None else int(niter.group(1))), scaling)


def _olora(w: torch.Tensor, r: int) -> tuple:
    # PEFT does not divide by the scaling here: s·B·A = s·Q_r R_r, whatever s is.
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _residual(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    # (s·B)·A in PEFT's order of operations, so a dense residual is PEFT's to the last bit.
    return w - (scaling * B) @ A


def loftq(w: torch.Tensor, r: int, scaling: float, iters: int, blocksize: int = LOFTQ_BLOCKSIZE,
          double_quant: bool = LOFTQ_DOUBLE_QUANT) -> tuple[NF4Weight, torch.Tensor, torch.Tensor]:
    """PEFT's loftq_init loop over our NF4 quantizer, for a dense fp32 (out, in) weight: Q = NF4(W), then
    A, B = top-r SVD of W - dequant(Q), and again Q = NF4(W - s·B·A) ... iters times. PEFT splits the SVD as
    if s were 1 (its layer then adds s·B·A, off by s: peft#1982); we split it as PiSSA does, so s·B·A is the
    product PEFT's B·A is and the residuals, hence Q, are PEFT's for every s (to rounding; bit for bit at s = 1)."""
    res = w
    for i in range(iters):
        qw = quantize_nf4(res, blocksize, double_quant)
        A, B = _split(*_top_r(w - dequantize_nf4(qw, torch.float32), r), scaling)
        if i + 1 < iters:
            res = _residual(w, A, B, scaling)
    return qw, A, B


# ---------------------------------------------------------------- the layer


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as fp32 (out, in) on its device (read only: for an fp32 Linear it is the parameter's data)."""
    if isinstance(base, NF4Linear):
        return base.dequantize(torch.float32)
    w = base.weight.detach()
    return (w.t() if is_conv1d(base) else w).to(torch.float32).contiguous()


def _store_weight(base: nn.Module, w: torch.Tensor) -> None:
    """Write an fp32 (out, in) weight back in the base's own format: same dtype and layout when dense (in place,
    as PEFT's weight.data), re-quantized with the same blocksize/double quant/storage when NF4. The dequantized
    dtype stays the layer's: the residual is quantized from fp32 without a detour through it."""
    if isinstance(base, NF4Linear):
        qw = base.qweight
        new = quantize_nf4(w, qw.blocksize, qw.double_quant, qw.quant_storage)
        base._set_weight(replace(new, dtype=qw.dtype))
    else:
        base.weight.data.copy_(w.t() if is_conv1d(base) else w)


def _as_stored(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """t rounded to the adapter parameter's dtype, back in fp32: the residual is taken against the values the
    layer will hold, so a bf16 adapter still leaves the output at init unchanged."""
    return t.to(param.dtype).to(torch.float32)


def _set_adapter(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    layer.lora_A.data.copy_(A)
    layer.lora_B.data.copy_(B)


def _quantize_base(layer: nn.Module, qw: NF4Weight) -> None:
    """LoftQ: the dense base (nn.Linear or Conv1D, bias kept) becomes an NF4Linear holding qw, frozen."""
    base = layer.base_layer
    nf4 = NF4Linear.from_linear(base, qw.blocksize, qw.double_quant)
    nf4._set_weight(replace(qw, dtype=base.weight.dtype))
    layer.base_layer = nf4.requires_grad_(False)


@torch.no_grad()
def initialize_(layer: nn.Module, init_lora_weights, loftq_config=None) -> None:
    """Set layer.lora_A / lora_B (in place, .data) and, for pissa/olora/loftq, the base weight. Everything is
    checked and computed before the layer changes, so a bad value leaves it as it was."""
    check_init_lora_weights(init_lora_weights, loftq_config, layer.base_layer)
    kind = _kind(init_lora_weights)
    if kind == "plain":
        init_lora_(layer.lora_A, layer.lora_B, init_lora_weights)
        return
    r, scaling = layer.lora_A.shape[0], layer.scaling
    if kind != "olora" and scaling == 0:
        raise ValueError(f"init_lora_weights={init_lora_weights!r} divides the singular values by the scaling "
                         f"and needs lora_alpha > 0, got scaling {scaling}")
    w = _dense_weight(layer.base_layer)
    if kind == "loftq":
        qw, A, B = loftq(w, r, scaling, _loftq_settings(loftq_config)[1])
        _quantize_base(layer, qw)
    else:
        A, B = _pissa(w, r, scaling, init_lora_weights) if kind == "pissa" else _olora(w, r)
        A, B = _as_stored(A, layer.lora_A), _as_stored(B, layer.lora_B)
        _store_weight(layer.base_layer, _residual(w, A, B, scaling))
    _set_adapter(layer, A, B)


# ---------------------------------------------------------------- back to plain LoRA

_CONVERTIBLE = ("pissa", "olora", "corda", "lora_ga", "true")  # PEFT's list; anything else only warns there


def _initial(initial_weights: dict, key: str, trained: torch.Tensor) -> torch.Tensor:
    t = initial_weights.get(key)
    if t is None:
        raise ValueError(f"to_plain_lora: the initial adapter has no {key!r}; pass the adapter saved right after "
                         f"initialisation, with the same target modules")
    if t.shape != trained.shape:
        raise ValueError(f"to_plain_lora: {key} is {tuple(trained.shape)} in the trained adapter but "
                         f"{tuple(t.shape)} in the initial one")
    return t.to(trained)


def _plain_config(config: dict) -> dict:
    """PEFT's rule: rank doubles; alpha doubles too (alpha / sqrt(2) more with rsLoRA, alpha / sqrt(r) scaling),
    so the scaling of the 2r adapter is the trained one's; rank_pattern and alpha_pattern double."""
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError("to_plain_lora is not supported for use_rslora=True with rank_pattern or alpha_pattern "
                         "(as in PEFT): the doubled alphas would not keep each layer's scaling")
    if not str(config.get("init_lora_weights")).lower().startswith(_CONVERTIBLE):
        warnings.warn("to_plain_lora only makes sense for an adapter initialised with PiSSA/OLoRA (it converts "
                      f"one to LoRA), got init_lora_weights={config.get('init_lora_weights')!r}", UserWarning,
                      stacklevel=3)
    out = copy.deepcopy(config)
    out["init_lora_weights"] = True
    out["r"] = 2 * config["r"]
    out["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if out.get(key):
            out[key] = {k: 2 * v for k, v in out[key].items()}
    return out


def to_plain_lora(weights: dict, initial_weights: dict, config: dict) -> tuple[dict, dict]:
    """A trained PiSSA/OLoRA adapter as a plain LoRA one over the ORIGINAL base (PEFT's
    path_initial_model_for_weight_conversion): W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B | -B0]·[A ; A0].
    weights / initial_weights: '<path>.lora_A.weight' / '<path>.lora_B.weight' tensors of the trained adapter and
    of the one saved right after get_peft_model; config: the adapter's PEFT config dict. Returns the tensors
    (rank 2r) and the config (PEFT's alpha rule). Like PEFT, only the LoRA pairs are kept: other tensors (biases,
    modules_to_save) are left out, with a warning naming them."""
    new_config = _plain_config(config)
    out = {}
    for key, t in weights.items():
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([t, _initial(initial_weights, key, t)], dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([t, -_initial(initial_weights, key, t)], dim=1)
    dropped = sorted(set(weights) - set(out))
    if dropped:
        warnings.warn(f"to_plain_lora keeps only the LoRA pairs, as PEFT's conversion does; left out: {dropped}",
                      UserWarning, stacklevel=2)
    return out, new_config
