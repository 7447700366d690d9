"""NF4 4-bit weights, bit-compatible with bitsandbytes: NF4Weight, quantize/dequantize, NF4Linear.

A bitsandbytes `Linear4bit` state dict loads into NF4Linear and ours loads into bitsandbytes
(`Params4bit.from_prequantized`): same keys, same bytes.

NaN and Inf, as bitsandbytes does it: a block holding a NaN stores absmax NaN and dequantizes to
NaN in full; a block holding +-Inf stores absmax Inf and dequantizes to NaN except the Inf
entries, which come back as +Inf. Without double quantization other blocks are unaffected; with it
(the default) the absmaxes' mean, the nested offset, is not finite either, and the whole weight
dequantizes to NaN. All-zero blocks come back as zeros.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from . import ops, reference

QUANT_TYPE = "nf4"
NESTED_BLOCKSIZE = reference.NESTED_BLOCKSIZE
_QS_KEY = "quant_state.bitsandbytes__nf4"
# what bitsandbytes writes after "weight." for a 4-bit weight (nested_* with double quantization)
_QUANT_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_KEY)
_FLOAT_TYPES = ops._FLOAT_TYPES
_STORAGE_TYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_code_cache: dict = {}


def _nf4_code(device) -> torch.Tensor:
    key = ("nf4", str(device))
    if key not in _code_cache:
        _code_cache[key] = reference.NF4_CODE.to(device)
    return _code_cache[key]


def _dynamic_code(device) -> torch.Tensor:
    key = ("dynamic", str(device))
    if key not in _code_cache:
        _code_cache[key] = reference.dynamic_map().to(device)
    return _code_cache[key]


def check_blocksize(blocksize) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or not ops._valid_blocksize(blocksize):
        raise ValueError(f"blocksize must be a power of two in [32, 4096] (bitsandbytes' range), got {blocksize!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or dt not in _FLOAT_TYPES:
        raise ValueError(f"quant state dtype must be float32, float16 or bfloat16, got {name!r}")
    return dt


@dataclass(frozen=True)
class NF4Weight:
    """A tensor quantized to NF4.

    data: packed codes, uint8 of shape ((n+1)//2, 1), or those bytes viewed as `quant_storage`.
    absmax: float32 per block, or uint8 per block when double-quantized (then nested_absmax,
    nested_code and offset decode it). shape/dtype: the original tensor's.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_storage(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes as uint8, whatever the storage dtype."""
        return self.data if self.data.dtype == torch.uint8 else self.data.reshape(-1).view(torch.uint8).view(-1, 1)

    @property
    def nbytes(self) -> int:
        ts = [self.data, self.absmax, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def to(self, device) -> "NF4Weight":
        def mv(t):
            return None if t is None else t.to(device)
        return replace(self, data=mv(self.data), absmax=mv(self.absmax), nested_absmax=mv(self.nested_absmax),
                       nested_code=mv(self.nested_code), offset=mv(self.offset))

    def with_storage(self, quant_storage: torch.dtype) -> "NF4Weight":
        """The same bytes viewed as another dtype (bitsandbytes' quant_storage, so FSDP can shard them)."""
        raw = self.packed.reshape(-1)
        _check_storage_fits(raw.numel(), quant_storage)
        return replace(self, data=raw.view(quant_storage).view(-1, 1))

    # -- bitsandbytes QuantState, packed for a state dict (keys without the "weight." prefix) --
    def quant_state_dict(self) -> dict:
        meta = {"quant_type": QUANT_TYPE, "blocksize": self.blocksize, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape)}
        out = {"absmax": self.absmax, "quant_map": _nf4_code(self.device).clone()}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.offset.item()))
        out[_QS_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_quant_state_dict(cls, data: torch.Tensor, qs: dict, expected_shape=None) -> "NF4Weight":
        """Validate a bitsandbytes quant state (tensors + the packed JSON) and build an NF4Weight."""
        if _QS_KEY not in qs:
            others = [k for k in qs if k.startswith("quant_state.")]
            raise ValueError(f"expected the packed quant state key '{_QS_KEY}'"
                             + (f", found {others} (only nf4 is supported)" if others else ", found none"))
        try:
            meta = json.loads(bytes(qs[_QS_KEY].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"'{_QS_KEY}' is not a valid packed JSON quant state: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"'{_QS_KEY}' must hold a JSON object, got {type(meta).__name__}")
        if meta.get("quant_type") != QUANT_TYPE:
            raise ValueError(f"quant_type must be 'nf4', got {meta.get('quant_type')!r}")
        blocksize = meta.get("blocksize")
        check_blocksize(blocksize)
        shape = torch.Size(meta.get("shape") or ())
        if expected_shape is not None and tuple(shape) != tuple(expected_shape):
            raise ValueError(f"quant state shape must be {tuple(expected_shape)}, got {tuple(shape)}")
        dtype = _dtype_from_name(meta.get("dtype"))
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        nbytes = data.numel() * data.element_size()
        if nbytes != (n + 1) // 2:
            raise ValueError(f"packed weight must hold {(n + 1) // 2} bytes for shape {tuple(shape)}, "
                             f"got {nbytes} ({data.dtype}, shape {tuple(data.shape)})")
        for key in ("absmax", "quant_map"):
            if key not in qs:
                raise ValueError(f"quant state is missing '{key}'")
        qmap = qs["quant_map"]
        if qmap.numel() != 16 or not torch.equal(qmap.float().cpu(), reference.NF4_CODE):
            raise ValueError("quant_map must be the 16-entry NF4 code book")
        absmax = qs["absmax"]
        if absmax.numel() != nblocks:
            raise ValueError(f"absmax must have {nblocks} entries (one per block of {blocksize}), got {absmax.numel()}")
        nested = "nested_absmax" in qs
        if not nested:
            if absmax.dtype != torch.float32:
                raise ValueError(f"absmax must be float32, got {absmax.dtype}")
            return cls(data, absmax.reshape(-1), shape, dtype, blocksize)
        for key in ("nested_quant_map",):
            if key not in qs:
                raise ValueError(f"quant state has nested_absmax but is missing '{key}'")
        for key in ("nested_blocksize", "nested_offset"):
            if key not in meta:
                raise ValueError(f"packed quant state has nested_absmax but is missing '{key}'")
        nbs = meta["nested_blocksize"]
        if not isinstance(nbs, int) or isinstance(nbs, bool) or nbs < 1:
            raise ValueError(f"nested_blocksize must be a positive integer, got {nbs!r}")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"absmax must be uint8 under double quantization, got {absmax.dtype}")
        nested_absmax, nested_code = qs["nested_absmax"], qs["nested_quant_map"]
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != -(-nblocks // nbs):
            raise ValueError(f"nested_absmax must be float32 with {-(-nblocks // nbs)} entries, "
                             f"got {nested_absmax.dtype} with {nested_absmax.numel()}")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(f"nested_quant_map must be 256 float32 entries, got {nested_code.numel()} {nested_code.dtype}")
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
        return cls(data, absmax.reshape(-1), shape, dtype, blocksize, nested_absmax.reshape(-1),
                   nested_code.reshape(-1).contiguous(), offset, int(nbs))


def check_quantizable(name: str, weight: torch.Tensor, quant_storage: torch.dtype) -> None:
    """What quantize_nf4 would refuse for this weight, found without quantizing it: a caller converting many
    layers checks them all before it changes the first."""
    if weight.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{name}: NF4 quantizes float32, float16 or bfloat16 weights, got {weight.dtype}")
    _check_storage_fits((weight.numel() + 1) // 2, quant_storage, f"{name}: ")


def _check_storage_fits(nbytes: int, quant_storage: torch.dtype, prefix: str = "") -> None:
    """nbytes packed bytes viewed as quant_storage (bitsandbytes' storage dtypes) must fill whole elements."""
    if quant_storage not in _STORAGE_TYPES:
        raise ValueError(f"quant_storage must be one of {_STORAGE_TYPES}, got {quant_storage}")
    size = torch.empty((), dtype=quant_storage).element_size()
    if nbytes % size:
        raise ValueError(f"{prefix}{nbytes} packed bytes cannot be viewed as {quant_storage} ({size} bytes each); "
                         f"use quant_storage=torch.uint8")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8) -> NF4Weight:
    """Quantize a float32/float16/bfloat16 tensor to NF4 exactly as bitsandbytes' quantize_4bit(quant_type='nf4')."""
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_TYPES:
        raise TypeError(f"quantize_nf4 expects a float32, float16 or bfloat16 tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    check_blocksize(blocksize)
    w = w.detach()
    packed, absmax = ops.quantize_nf4_packed(w, blocksize)
    qw = NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        code = _dynamic_code(w.device)
        q, nested, offset = ops.double_quant(absmax, code, NESTED_BLOCKSIZE)
        qw = NF4Weight(packed, q, w.shape, w.dtype, blocksize, nested, code.clone(), offset, NESTED_BLOCKSIZE)
    return qw if quant_storage == torch.uint8 else qw.with_storage(quant_storage)


def dequantize_nf4(qw: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Back to a dense tensor of qw.shape in `dtype` (default: the dtype it was quantized from), in one kernel."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"dequantize_nf4 expects an NF4Weight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if dtype not in _FLOAT_TYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return ops.dequantize_nf4_packed(qw.packed, qw.absmax, qw.blocksize, qw.shape, dtype, qw.nested_absmax,
                                     qw.nested_code, qw.offset, qw.nested_blocksize)


_FROZEN = ("nf4_linear: the NF4 base weight is frozen and has no gradient; set requires_grad=False on it "
           "(train an adapter instead)")


def check_nf4_linear_args(x: torch.Tensor, qw: NF4Weight) -> None:
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"nf4_linear expects an NF4Weight, got {type(qw).__name__}")
    if len(qw.shape) != 2:
        raise ValueError(f"nf4_linear needs a 2-D weight (out_features, in_features), got shape {tuple(qw.shape)}")
    if qw.data.requires_grad:
        raise RuntimeError(_FROZEN)
    if x.shape[-1:] != qw.shape[1:]:
        raise ValueError(f"nf4_linear: input's last dimension must be in_features={qw.shape[1]}, "
                         f"got input of shape {tuple(x.shape)}")


def nf4_linear(x: torch.Tensor, qw: NF4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, differentiable with respect to x (and bias); W gets no gradient.

    Few rows of x (decode) take a fused kernel that reads the packed weight directly; more rows
    dequantize into a reused workspace and use BLAS. Backward keeps only the packed weight.
    """
    check_nf4_linear_args(x, qw)
    return ops.nf4_linear(x, qw.packed, qw.absmax, qw.shape[0], qw.blocksize, bias, qw.nested_absmax,
                          qw.nested_code, qw.offset, qw.nested_blocksize)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored in NF4; state dicts use bitsandbytes' Linear4bit keys."""

    _QUANT_STATE = ("absmax", "nested_absmax", "nested_code", "offset")
    _conv1d_type = None  # the Hugging Face Conv1D class it was quantized from, if any (to_linear rebuilds one)
    _cast_dtype = None  # the float dtype the module was last cast to, where not the weight's own (to_linear's)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, dtype: torch.dtype = torch.float32, device=None,
                 quant_storage: torch.dtype = torch.uint8):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        zeros = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        self._set_weight(quantize_nf4(zeros, blocksize, double_quant, quant_storage))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8) -> "NF4Linear":
        """Quantize an nn.Linear, or a Hugging Face Conv1D (its (in, out) weight is quantized as the (out, in)
        Linear it stands for, as transformers' bitsandbytes integration does)."""
        if isinstance(linear, nn.Linear):
            weight = linear.weight.detach()
        elif is_conv1d(linear):
            weight = linear.weight.detach().t()
        else:
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear or a Hugging Face Conv1D, "
                            f"got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if is_conv1d(linear):
            self._conv1d_type = type(linear)
        self.out_features, self.in_features = weight.shape
        self._set_weight(quantize_nf4(weight, blocksize, double_quant, quant_storage))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                 requires_grad=linear.bias.requires_grad)
        return self

    def _set_weight(self, qw: NF4Weight) -> None:
        self.weight = nn.Parameter(qw.data, requires_grad=False)
        self.quant_storage = qw.data.dtype
        # Non-persistent: they travel with .to(); the state dict gets bitsandbytes' names instead.
        self.register_buffer("absmax", qw.absmax, persistent=False)
        self.register_buffer("nested_absmax", qw.nested_absmax, persistent=False)
        self.register_buffer("nested_code", qw.nested_code, persistent=False)
        self.register_buffer("offset", qw.offset, persistent=False)
        self.blocksize, self.dtype, self.nested_blocksize = qw.blocksize, qw.dtype, qw.nested_blocksize

    @property
    def qweight(self) -> NF4Weight:
        if self.weight.dtype != self.quant_storage:
            raise RuntimeError(
                f"NF4Linear: the packed 4-bit weight is stored as {self.quant_storage} but arrived as "
                f"{self.weight.dtype}: something cast it (a mixed-precision policy such as FSDP's "
                f"MixedPrecisionPolicy(param_dtype=...); module.to(dtype) leaves NF4 data alone), which corrupts "
                f"the packed data. Keep quant_storage=torch.uint8 (such casts skip integer parameters) or make the "
                f"policy's param_dtype equal to the storage dtype.")
        return NF4Weight(self.weight.data, self.absmax, torch.Size((self.out_features, self.in_features)), self.dtype,
                         self.blocksize, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError(_FROZEN)
        return nf4_linear(x, self.qweight, self.bias_for(x))

    def bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bias in x's dtype (the layer computes in the activations' dtype), or None."""
        return None if self.bias is None else self.bias.to(x.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nf4(self.qweight, dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A frozen dense layer holding the dequantized weight: an nn.Linear, or the Hugging Face Conv1D it came
        from (weight transposed back), so a model saved with it loads as the original architecture. dtype: by
        default the one the module was last cast to (model.half(), .to(torch.bfloat16)), else the one its
        weight was quantized from."""
        dtype = dtype or self._cast_dtype or self.dtype
        w = self.dequantize(dtype)
        if self._conv1d_type is not None:
            layer = self._conv1d_type(self.out_features, self.in_features).to(device=w.device, dtype=dtype)
            w = w.t()
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=w.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / model.half() cast every floating tensor; the packed bytes (when viewed as a
        # float quant_storage) and the quantization state may only move, never change dtype.
        kept = {name: self._buffers[name] for name in self._QUANT_STATE if self._buffers.get(name) is not None}
        packed = self.weight.data
        super()._apply(fn, recurse)
        # What a float tensor of the weight's dtype became: the dtype to_linear dequantizes to.
        cast = fn(torch.empty(0, dtype=self._cast_dtype or self.dtype)).dtype
        self._cast_dtype = None if cast == self.dtype else cast
        for name, old in kept.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        if self.weight.dtype != packed.dtype:
            self.weight.data = packed.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, dtype={self.dtype}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for k, v in self.qweight.quant_state_dict().items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "weight" not in ours:
            missing_keys.append(prefix + "weight")
            return
        if self.bias is not None and "bias" not in ours:
            missing_keys.append(prefix + "bias")
        qs = {k[len("weight."):]: v for k, v in ours.items() if k.startswith("weight.")}
        try:
            qw = NF4Weight.from_quant_state_dict(ours["weight"], qs, (self.out_features, self.in_features))
            bias = ours.get("bias")
            if bias is not None and self.bias is not None and bias.shape != self.bias.shape:
                raise ValueError(f"bias must have shape {tuple(self.bias.shape)}, got {tuple(bias.shape)}")
        except ValueError as e:
            error_msgs.append(f"NF4Linear '{prefix}': {e}")
            return
        # load_state_dict(assign=True), or a module built on the meta device: the checkpoint's tensors as they are
        assign = local_metadata.get("assign_to_params_buffers", False) or self.weight.is_meta
        device = ours["weight"].device if assign else self.weight.device
        self._set_weight(qw.to(device))
        if bias is not None and self.bias is not None:
            with torch.no_grad():
                self.bias = nn.Parameter(bias.detach() if assign else bias.detach().to(self.bias).clone(),
                                         requires_grad=self.bias.requires_grad)
        if strict:
            known = {"weight"} | ({"bias"} if self.bias is not None else set()) | \
                {"weight." + k for k in _QUANT_STATE_KEYS}
            unexpected_keys.extend(prefix + k for k in ours if k not in known)
