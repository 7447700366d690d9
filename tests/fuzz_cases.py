"""Property fuzz of every lora_ext operator and public function, with lora_ext.reference as the oracle.

tests/test_fuzz.py runs this file in a subprocess, so that a crash fails a test instead of killing the suite;
by hand: `python tests/fuzz_cases.py --results r.json [--seconds 600] [target ...]`. Each case is printed and
flushed before it runs: after a crash, the last `CASE` line names the culprit.

The rule, for every call: it returns what lora_ext.reference returns for the same inputs (bit for bit where
the format demands it, within the dtype's tolerance otherwise), or it raises a RuntimeError, ValueError,
TypeError or IndexError whose message says what was expected, and then every input is byte for byte as it
was. A case drawn inside every argument's contract (Case.valid) must not raise. Cases are plain specs (T:
shape, dtype, layout, special values, device, seed), so a printed case rebuilds the same tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import re
import resource
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

import lora_ext
from lora_ext import reference as R
from lora_ext.lora import _dropout_seed
from lora_ext.merge import MergeError, merge_nf4_reference

OPS = torch.ops.lora_ext
NAN, INF = float("nan"), float("inf")

FLOATS = ("float32", "float16", "bfloat16")
FLOATS64 = FLOATS + ("float64",)
ALL_DTYPES = FLOATS64 + ("int32", "int64", "uint8", "bool", "complex64")
DIMS = (1, 2, 3, 7, 0, 8, 33, 64, 65)
BIG_DIMS = (1, 3, 7, 46341, 65537)  # two of the large ones multiply past 2**31
RANKS = (1, 2, 3, 7, 8, 16)
VALID_BS = (64, 32, 128, 256, 512, 1024, 2048, 4096)
BAD_BS = st.sampled_from((0, 48, 8192, -64, 16, 1, 2**40))
GOOD_P = st.sampled_from((0.0, 0.1, 0.5, 0.999, 1e-9))
BAD_P = st.sampled_from((-0.1, 1.0, NAN, INF, 1.5, -INF))
# (drawn floats stay above 1e-6: a subnormal scale makes (dy s) B and (dy B) s underflow differently)
FINITE_SCALES = st.sampled_from((1.0, 0.0, -0.0, 0.5, -2.0, 1e-30, 1e30)) | st.floats(1e-6, 64) | st.floats(-64, -1e-6)
# NaN but not +-Inf: y = base + Inf (T B^T) is NaN where T B^T is exactly 0, and whether an fp32 sum rounds to
# exactly 0 is no property of the kernels.
SCALES = FINITE_SCALES | st.just(NAN)
SEEDS = st.integers(-2**63, 2**63 - 1)
BAD_SEEDS = st.sampled_from((2**63, -2**63 - 1, 2**64))
LAYOUTS = "cotxs"  # contiguous, storage offset, transposed, expanded (stride 0), step slice
SPECIALS = ("", "", "", "", "nan", "inf", "-inf", "mix", "zero")
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
_SAYS_WHAT = re.compile(r"must|expect|got|should|requir|cannot|can't|invalid|mismatch|only|not supported|at least|need",
                        re.I)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------- specs and how they become tensors


def _r(v) -> str:
    """repr that is valid Python for non-finite floats too, so a printed case can be pasted into @example."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"float('{v}')"
    return repr(v)


@dataclass(frozen=True)
class T:
    """One tensor to build. special: '' | nan | inf | -inf | mix (nan, inf, -inf, 0) | zero (all zeros), placed
    in the backing storage. device: cpu | meta | fake (a FakeTensorMode tensor). fill: randn | abs | bytes
    (0..255) | dynmap (bitsandbytes' 8-bit map, when the tensor has 256 elements)."""

    shape: tuple
    dtype: str = "float32"
    layout: str = "c"
    special: str = ""
    device: str = "cpu"
    seed: int = 0
    fill: str = "randn"

    def __repr__(self):
        extra = "".join(f", {f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)[2:]
                        if getattr(self, f.name) != f.default)
        return f"T({self.shape!r}, {self.dtype!r}{extra})"


@dataclass(frozen=True)
class Case:
    target: str
    valid: bool  # drawn inside every argument's contract: the call must succeed
    args: tuple  # ((name, value), ...)

    @classmethod
    def of(cls, target: str, valid: bool = True, **args) -> "Case":
        return cls(target, valid, tuple(args.items()))

    def __repr__(self):
        return f"Case.of({self.target!r}, {self.valid}, " + ", ".join(f"{k}={_r(v)}" for k, v in self.args) + ")"

    def specs(self) -> list:
        return [v for _, v in self.args if isinstance(v, T)]


def _layout(shape: tuple, layout: str):
    """(shape of the backing tensor, the view of it that has `shape`)."""
    if layout == "o":
        return (math.prod(shape) + 3,), lambda b: b[3:].view(shape)
    if layout == "t" and len(shape) >= 2:
        return (*shape[:-2], shape[-1], shape[-2]), lambda b: b.transpose(-1, -2)
    if layout == "x" and len(shape) >= 1:
        return (1, *shape[1:]), lambda b: b.expand(shape)
    if layout in "ts" and len(shape) >= 1:
        return (*shape[:-1], 2 * shape[-1]), lambda b: b[..., ::2]
    return shape, lambda b: b


def _values(spec: T, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed)
    if spec.fill == "bytes":
        v = torch.randint(0, 256, shape, generator=g).double()
    else:
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        v = v.abs() if spec.fill == "abs" else v
    flat, n = v.view(-1), v.numel()
    if spec.special == "zero":
        flat.zero_()
    elif spec.special and n and (dtype.is_floating_point or dtype.is_complex):
        vals = torch.tensor({"nan": [NAN], "inf": [INF], "-inf": [-INF], "mix": [NAN, INF, -INF, 0.0]}[spec.special])
        flat[torch.randint(0, n, (len(vals),), generator=g)] = vals.double()
    if dtype == torch.bool:
        return v > 0
    if dtype.is_floating_point or dtype.is_complex or spec.fill == "bytes":
        return v.to(dtype)
    return (v * 4).round().clamp(0 if dtype == torch.uint8 else -100, 100).to(dtype)


def build(spec: T) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    base_shape, view = _layout(tuple(spec.shape), spec.layout)
    if spec.device == "cpu":
        t = view(_values(spec, base_shape, dtype))
    else:  # never allocates: meta, or fake under the caller's FakeTensorMode
        t = view(torch.empty(base_shape, dtype=dtype, device="meta" if spec.device == "meta" else "cpu"))
    if spec.fill == "dynmap" and spec.device == "cpu" and t.numel() == 256 and spec.layout != "x":
        t.copy_(R.dynamic_map().view(t.shape))
    return t


def materialize(case: Case) -> dict:
    return {k: build(v) if isinstance(v, T) else v for k, v in case.args}


# ---------------------------------------------------------------- the rule


def check_error(e: BaseException, names=()) -> None:
    """Not empty, not an internal assert, and it says what was expected or names the argument at fault
    (one of `names` longer than two letters: x, A or B would match any text)."""
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert "INTERNAL ASSERT FAILED" not in msg and "Please report a bug" not in msg, f"internal assert: {msg}"
    named = any(len(n) > 2 and n in msg for n in names)
    assert named or _SAYS_WHAT.search(msg), f"the message says neither what was expected nor which argument: {msg!r}"


def refused(case: Case, e: BaseException, names=(), what: str = "input") -> None:
    """An exception is an answer only with a clear message, and only to a case outside the contract."""
    check_error(e, names)
    assert not case.valid, f"refused a valid {what}: {type(e).__name__}: {e}"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


def _tensors(a: dict) -> dict:
    return {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}


def snapshot(tensors: dict) -> dict:
    """Storage bytes (NaN equals itself) and metadata of every CPU tensor."""
    return {k: (_bytes(t), [t.shape, t.stride(), t.storage_offset(), t.dtype]) for k, t in tensors.items()
            if t.device.type == "cpu"}


def assert_unchanged(tensors: dict, snap: dict, mutable=()) -> None:
    for k, (raw, meta) in snap.items():
        if k not in mutable:
            t = tensors[k]
            assert [t.shape, t.stride(), t.storage_offset(), t.dtype] == meta, f"input {k}: metadata changed"
            assert torch.equal(_bytes(t), raw), f"input {k} changed"


def _each(f: Callable) -> Callable:
    """f over matching leaves of two (nested) tuples; non-tensor leaves compare with ==."""
    def cmp(a, b, path="out"):
        if isinstance(b, (tuple, list)):
            assert isinstance(a, (tuple, list)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
            for i, (x, y) in enumerate(zip(a, b)):
                cmp(x, y, f"{path}[{i}]")
        elif isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{path}: got {type(a).__name__}, expected a tensor"
            f(a, b, path)
        else:
            assert a == b, f"{path}: {a!r} != {b!r}"
    return cmp


def _exact(a, b, path):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{path}: {m}")


def _close_to(tol: float) -> Callable:
    def close(a, b, path, magnitude=None):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), \
            f"{path}: {a.shape} {a.dtype} {a.device} vs {b.shape} {b.dtype} {b.device}"
        a, b = a.double(), b.double()
        assert torch.equal(a.isnan(), b.isnan()), f"{path}: NaN at other positions"
        inf = b.isinf()
        assert torch.equal(a.isinf(), inf) and torch.equal(a[inf], b[inf]), f"{path}: Inf at other positions"
        fin = b.isfinite()
        if fin.any():
            err, ref = (a[fin] - b[fin]).abs(), b[fin].abs()
            bound = tol * (ref + ref.max())
            if magnitude is not None:  # sum of |terms|, where one rounded summand may dwarf a cancelled result
                bound = bound + tol * torch.nan_to_num(magnitude.double()[fin], nan=math.inf)
            assert (err <= bound).all(), f"{path}: max error {err.max().item():.3g} (tolerance {tol:g} rel)"
    return close


def exact(out, expected, a, magnitude=None) -> None:
    _each(_exact)(out, expected)


def close(out, expected, a, magnitude=None) -> None:
    """Within the tolerance of the least precise float dtype among the arguments, relative to the result or,
    when that fails, to the same computation on absolute values (magnitude(): the dot-product error bound)."""
    tol = max([TOL.get(t.dtype, 0.0) for t in _tensors(a).values()] + [TOL[torch.float32]])
    try:
        _each(_close_to(tol))(out, expected)
    except AssertionError:
        if magnitude is None:
            raise
        _each(lambda *_: None)(out, expected)  # the structure and the non-tensor leaves
        for i, (x, y, m) in enumerate(zip(_leaves(out), _leaves(expected), _leaves(magnitude()))):
            _close_to(tol)(x, y, f"out leaf {i}", m)


def _leaves(t) -> list:
    """The tensors of a nested tuple, in order."""
    if isinstance(t, (tuple, list)):
        return [leaf for x in t for leaf in _leaves(x)]
    return [t] if isinstance(t, torch.Tensor) else []


def magnitudes(a: dict) -> dict:
    """The arguments with every float made non-negative: an oracle over them sums |terms| (a rounding bound)."""
    def pos(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.abs()
        return abs(v) if isinstance(v, float) else v
    return {**{k: pos(v) for k, v in a.items()}, "_magnitudes": True}


def _same_shapes(out, expected, dtypes: bool = True) -> None:
    """The fake kernel's outputs have the expected shapes (and dtypes)."""
    def same(a, b, path):
        got, want = (tuple(a.shape), a.dtype if dtypes else None), (tuple(b.shape), b.dtype if dtypes else None)
        assert got == want, f"{path}: the fake kernel gives {got}, expected {want}"
    _each(same)(out, expected)


_RAISED = object()


def check(case: Case, call: Callable, oracle: Callable, compare: Callable, mutable=(), twin: bool = True) -> None:
    """The rule for one case; with twin, the same call on meta copies of the inputs (the fake kernels) must
    give the CPU result's shapes and dtypes, and may refuse a valid case only if the CPU kernel does."""
    a = materialize(case)
    tensors = _tensors(a)
    snap = snapshot(tensors)
    try:
        out = call(a)
    except ERRORS as e:
        assert_unchanged(tensors, snap)
        refused(case, e, a)
        out = _RAISED
    else:
        assert_unchanged(tensors, snap, mutable)
        devices = {t.device.type for t in tensors.values()}
        assert devices <= {"cpu"} or devices == {"meta"}, f"accepted tensors on {sorted(devices)} together"
        if devices <= {"cpu"}:
            try:
                expected = oracle(materialize(case))
            except Exception as e:  # noqa: BLE001 (any failure of the oracle is the finding)
                raise AssertionError(f"accepted an input the reference cannot compute: {type(e).__name__}: {e}")
            compare(out, expected, a, lambda: oracle(magnitudes(materialize(case))))
    if twin and all(v.device == "cpu" for v in case.specs()):
        _meta_twin(case, call, out)


def _meta_twin(case: Case, call: Callable, out) -> None:
    twin = replace(case, args=tuple((k, replace(v, device="meta") if isinstance(v, T) else v) for k, v in case.args))
    try:
        meta_out = call(materialize(twin))
    except ERRORS as e:
        check_error(e, dict(case.args))
        # (outside the contract torch's own meta kernels may refuse what its CPU ones let through)
        assert out is _RAISED or not case.valid, f"the fake kernel refuses a valid input the CPU kernel accepts: {e}"
        return
    if out is not _RAISED:
        _same_shapes(meta_out, out)


# ---------------------------------------------------------------- strategies: nominal arguments, then mutations


@dataclass(frozen=True)
class Rule:
    """What an argument's contract allows, so that a mutation can step outside it."""

    dtypes: tuple = FLOATS
    contiguous: bool = False
    optional: bool = False
    reshape: bool = True  # False: a module's weight, whose shape its module fixes
    meta: bool = True  # False: where a module's forward answers for the devices (multi_lora_linear's module base)


def tensor(shape, dtypes=FLOATS, layouts=LAYOUTS, fill="randn", specials=SPECIALS, device="cpu"):
    return st.builds(T, st.just(tuple(shape)), st.sampled_from(dtypes), st.sampled_from(layouts),
                     st.sampled_from(specials), st.just(device), st.integers(0, 2**31 - 1), st.just(fill))


def shapes(dims, lo: int, hi: int):
    return st.lists(st.sampled_from(dims), min_size=lo, max_size=hi).map(tuple)


def _perturbed(shape: tuple):
    """Shapes that break a shape rule: a dimension dropped, added, grown, emptied."""
    options = [shape[:-1], (2, *shape), (*shape[:-1], shape[-1] + 1), (0, *shape[1:])] if shape else [(1,), (2,)]
    return st.sampled_from([s for s in options if s != shape] or [(5,)])


@st.composite
def _mutated_tensor(draw, spec: T, rule: Rule):
    kinds = ["dtype"] + ["meta"] * rule.meta + ["shape"] * rule.reshape + ["layout"] * rule.contiguous \
        + ["none"] * rule.optional
    kind = draw(st.sampled_from(kinds))
    if kind == "dtype":
        return replace(spec, dtype=draw(st.sampled_from([d for d in ALL_DTYPES if d not in rule.dtypes])))
    if kind == "shape":
        return replace(spec, shape=draw(_perturbed(spec.shape)))
    if kind == "meta":
        return replace(spec, device="meta")
    if kind == "layout":
        return replace(spec, layout=draw(st.sampled_from("txs")))
    return None


def mutate(draw, args: dict, rules: dict) -> tuple:
    """Up to two mutations, each outside one argument's contract (a Rule for a tensor, a strategy of bad values
    for a scalar) -> (args, whether none was made)."""
    n = draw(st.sampled_from((0, 1, 0, 2)))
    for _ in range(n):
        names = sorted(k for k, rule in rules.items() if not isinstance(rule, Rule) or args.get(k) is not None)
        name = draw(st.sampled_from(names))
        rule = rules[name]
        args[name] = draw(_mutated_tensor(args[name], rule) if isinstance(rule, Rule) else rule)
    return args, n == 0


def as_cases(target: str, builder: Callable, dims=DIMS, device="cpu", extra=()):
    """Cases of `target` from builder(dims, device), a strategy of (args, rules, valid)."""
    @st.composite
    def cases(draw):
        args, rules, ok = draw(builder(dims, device))
        args, unmutated = mutate(draw, args, rules)
        return Case(target, ok and unmutated, tuple(extra) + tuple(args.items()))
    return cases()


# ---------------------------------------------------------------- NF4 state, shared by the NF4 operators

_NF4_KEYS = ("packed", "absmax", "blocksize", "nested_absmax", "nested_code", "offset", "nested_blocksize")


@st.composite
def nf4_state(draw, n: int, device: str):
    """Any packed bytes (every byte is a valid pair of codes) and a random absmax, plain or double-quantized."""
    bs = draw(st.sampled_from(VALID_BS))
    nblocks = -(-n // bs)
    f32 = dict(dtypes=("float32",), device=device)
    args = dict(packed=draw(tensor(((n + 1) // 2, 1), ("uint8",), "co", "bytes", ("",), device)), blocksize=bs,
                nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256)
    rules = dict(packed=Rule(("uint8",), contiguous=True), blocksize=BAD_BS)
    if draw(st.booleans()):
        nbs = draw(st.sampled_from((256, 32, 64, 4096)))
        args.update(absmax=draw(tensor((nblocks,), ("uint8",), "co", "bytes", ("",), device)), nested_blocksize=nbs,
                    nested_absmax=draw(tensor((-(-nblocks // nbs),), layouts="co", fill="abs", **f32)),
                    nested_code=draw(tensor((256,), layouts="co", fill="dynmap", specials=("",), **f32)),
                    offset=draw(tensor((), fill="abs", **f32)))
        nested = Rule(("float32",), contiguous=True, optional=True)
        rules.update(absmax=Rule(("uint8",), contiguous=True), nested_blocksize=BAD_BS, nested_absmax=nested,
                     nested_code=nested, offset=Rule(("float32",), optional=True))
    else:
        args.update(absmax=draw(tensor((nblocks,), layouts="co", fill="abs", **f32)))
        rules.update(absmax=Rule(("float32",), contiguous=True))
    return args, rules


def _state(a: dict) -> tuple:
    return tuple(a[k] for k in _NF4_KEYS)


def _nested(a: dict) -> tuple:
    return a["nested_absmax"], a["nested_code"], a["offset"], a["nested_blocksize"]


def d64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _dt(a: dict, name: str) -> torch.dtype:
    return a[name].dtype


# ---------------------------------------------------------------- the operators (torch.ops.lora_ext.*)


@dataclass(frozen=True)
class Op:
    """One operator: its arguments (builder(dims, device) -> strategy of (args, rules, valid)), the call, the
    oracle on a fresh copy of the arguments, how the results compare, and the output shapes and dtypes the
    fake kernel must give (formula, for sizes too large to run)."""

    name: str
    builder: Callable
    call: Callable
    oracle: Callable
    compare: Callable
    shapes: Callable
    mutable: tuple = ()


def _like(shape, dtype) -> torch.Tensor:
    return torch.empty(0, device="meta").new_empty(shape, dtype=dtype)


def _nf4_out_shapes(n: int, blocksize: int):
    return _like(((n + 1) // 2, 1), torch.uint8), _like((-(-n // blocksize),), torch.float32)


@st.composite
def _quantize_args(draw, dims, device):
    args = dict(A=draw(tensor(draw(shapes(dims, 0, 3)), device=device)), blocksize=draw(st.sampled_from(VALID_BS)))
    return args, dict(A=Rule(FLOATS), blocksize=BAD_BS), True


@st.composite
def _double_quant_args(draw, dims, device):
    args = dict(absmax=draw(tensor(draw(shapes(dims, 1, 2)), ("float32",), fill="abs", device=device)),
                code=draw(tensor((256,), ("float32",), "co", "dynmap", ("",), device)),
                blocksize=draw(st.sampled_from(VALID_BS)))
    rules = dict(absmax=Rule(("float32",)), code=Rule(("float32",), contiguous=True), blocksize=BAD_BS)
    return args, rules, True


@st.composite
def _dequantize_args(draw, dims, device, out=False):
    shape = draw(shapes(dims, 0, 3))
    args, rules = draw(nf4_state(math.prod(shape), device))
    if out:
        args["out"] = draw(tensor(shape, layouts="co", device=device))
        rules["out"] = Rule(FLOATS, contiguous=True)
    else:
        args.update(shape=shape, dtype=draw(st.sampled_from(FLOATS)))
        rules.update(shape=st.sampled_from([(*shape, 2), (-1, *shape), (-2, -2), (3,)]),
                     dtype=st.sampled_from(("float64", "int32", "uint8", "bool", "complex64")))
    return args, rules, True


def _dequantize(a):
    packed, absmax, bs, *nested = _state(a)
    return OPS.dequantize_nf4(packed, absmax, bs, list(a["shape"]), getattr(torch, a["dtype"]), *nested)


def _dequantize_ref(a):
    packed, absmax, bs, *nested = _state(a)
    return R.dequantize_nf4(packed, absmax, bs, a["shape"], getattr(torch, a["dtype"]), *nested)


def _dequantize_out(a, fn=OPS.dequantize_nf4_out):
    packed, absmax, bs, *nested = _state(a)
    fn(packed, absmax, bs, a["out"], *nested)
    return a["out"]


@st.composite
def _linear_args(draw, dims, device, grad_input=False):
    lead, K, N = draw(shapes(dims, 0, 2)), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    x = draw(tensor((*lead, N if grad_input else K), FLOATS64, device=device))
    args, rules = draw(nf4_state(N * K, device))
    rules["x"] = Rule(FLOATS64)
    if grad_input:
        args.update(x=x, in_features=K)
        rules["in_features"] = st.sampled_from((-1, K + 1))
        return args, rules, True
    bias = draw(st.none() | tensor((N,), (x.dtype,), device=device))
    args.update(x=x, out_features=N, bias=bias, gemv_max_m=draw(st.sampled_from((-1, 0, 1, 4, 1 << 20))))
    rules.update(bias=Rule((x.dtype,), optional=True), out_features=st.sampled_from((-1, N + 1)))
    return args, rules, True


def _nf4_linear(a):
    packed, absmax, bs, *nested = _state(a)
    return OPS.nf4_linear(a["x"], packed, absmax, a["out_features"], bs, a["bias"], *nested, a["gemv_max_m"])


def _nf4_linear_ref(a):
    """x W^T (+ bias) in fp64."""
    packed, absmax, bs, *nested = _state(a)
    return R.nf4_linear(d64(a["x"]), packed, absmax, a["out_features"], bs, d64(a["bias"]), *nested,
                        compute_dtype=torch.float64)


def _grad_input(a):
    packed, absmax, bs, *nested = _state(a)
    return OPS.nf4_linear_grad_input(a["x"], packed, absmax, a["in_features"], bs, *nested)


def _grad_input_ref(a):
    packed, absmax, bs, *nested = _state(a)
    return R.nf4_linear_grad_input(d64(a["x"]), packed, absmax, a["in_features"], bs, *nested,
                                   compute_dtype=torch.float64).to(a["x"].dtype)


@st.composite
def _dropout_args(draw, dims, device):
    args = dict(x=draw(tensor(draw(shapes(dims, 0, 3)), FLOATS64, device=device)), p=draw(GOOD_P), seed=draw(SEEDS))
    return args, dict(x=Rule(FLOATS64), p=BAD_P, seed=BAD_SEEDS), True


@st.composite
def _lora_args(draw, dims, device, base="forward"):
    """x (..., K), A (r, K), B (N, r) and the scalars; base: what else the op takes (forward: base_out,
    backward: grad_y, T, grad_x_base, linear: weight and bias, nf4: an NF4 weight and bias)."""
    lead, K, N = draw(shapes(dims, 0, 2)), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    r, adt = draw(st.sampled_from(RANKS + (0,))), draw(st.sampled_from(FLOATS64))
    x = draw(tensor((*lead, K), FLOATS64, device=device))
    args = dict(x=x, A=draw(tensor((r, K), (adt,), device=device)), B=draw(tensor((N, r), (adt,), device=device)),
                scale=draw(SCALES), dropout_p=draw(GOOD_P), seed=draw(SEEDS))
    rules = dict(x=Rule(FLOATS64), A=Rule((adt,)), B=Rule((adt,)), dropout_p=BAD_P, seed=BAD_SEEDS)
    if base == "forward":
        args["base_out"] = draw(tensor((*lead, N), FLOATS64, device=device))
        rules["base_out"] = Rule(FLOATS64)
    elif base == "backward":
        args.update(grad_y=draw(tensor((*lead, N), FLOATS64, device=device)),
                    T=draw(tensor((math.prod(lead), r), (adt,), device=device)),
                    grad_x_base=draw(st.none() | tensor((*lead, K), FLOATS64, device=device)))
        rules.update(grad_y=Rule(FLOATS64), T=Rule((adt,)), grad_x_base=Rule(FLOATS64, optional=True))
    else:
        # Dense: any float dtype of weight and bias is at::linear's business (autocast casts them there; without
        # it torch's CPU and meta linear disagree on mixed ones), so only non-float dtypes step outside.
        bias_dtypes = FLOATS64 if base == "linear" else (x.dtype,)
        if base == "linear":
            args["weight"] = draw(tensor((N, K), (x.dtype,), device=device))
            rules["weight"] = Rule(FLOATS64)
        else:
            state, state_rules = draw(nf4_state(N * K, device))
            args.update(state, out_features=N)
            rules.update(state_rules)
        args["bias"] = draw(st.none() | tensor((N,), (x.dtype,), device=device))
        rules["bias"] = Rule(bias_dtypes, optional=True)
    return args, rules, r > 0


def _branch(a) -> tuple:
    return a["A"], a["B"], a["scale"], a["dropout_p"], a["seed"]


def kernel_scale(scale: float, *operands) -> float:
    """The scale as the LoRA kernels use it: rounded to fp32 unless an operand is fp64 (compute dtype)."""
    if any(t is not None and t.dtype == torch.float64 for t in operands):
        return scale
    return torch.tensor(scale, dtype=torch.float32).item()


def _branch64(a) -> tuple:
    scale = kernel_scale(a["scale"], *(a.get(k) for k in ("x", "A", "base_out", "grad_y")))
    return d64(a["A"]), d64(a["B"]), scale, a["dropout_p"], a["seed"]


def _lora_forward_ref(a):
    y, t = R.lora_forward(d64(a["x"]), d64(a["base_out"]), *_branch64(a))
    return y.to(_dt(a, "base_out")), t.to(_dt(a, "A"))


def _lora_backward(a):
    return OPS.lora_backward(a["grad_y"], a["x"], a["T"], *_branch(a), a["grad_x_base"])


def _lora_backward_ref(a):
    dx, dA, dB = R.lora_backward(d64(a["grad_y"]), d64(a["x"]), d64(a["T"]), *_branch64(a), d64(a["grad_x_base"]))
    return dx.to(_dt(a, "x")), dA.to(_dt(a, "A")), dB.to(_dt(a, "B"))


def _lora_linear_ref(a):
    y, t = R.lora_linear(d64(a["x"]), d64(a["weight"]), d64(a["bias"]), *_branch64(a))
    # y in the dtype of the base product on the tensors as drawn (at::linear's own rule, even for empty ones)
    return y.to(torch.nn.functional.linear(a["x"], a["weight"], a["bias"]).dtype), t.to(_dt(a, "A"))


def _lora_nf4(a):
    packed, absmax, bs, nested_absmax, nested_code, offset, nbs = _state(a)
    return OPS.lora_nf4_linear(a["x"], packed, absmax, a["out_features"], bs, a["bias"], nested_absmax, nested_code,
                               offset, nbs, *_branch(a))


def _lora_nf4_ref(a):
    y, t = R.lora_forward(d64(a["x"]), _nf4_linear_ref(a), *_branch64(a))
    return y.to(_dt(a, "x")), t.to(_dt(a, "A"))


def _lora_shapes(a, out_shape, out_dtype):
    lead = a["x"].shape[:-1]
    return _like(out_shape, out_dtype), _like((math.prod(lead), a["A"].shape[0]), a["A"].dtype)


@st.composite
def _dora_args(draw, dims, device, base="forward"):
    """_lora_args without dropout, plus DoRA's g (N,) and, forward, an optional bias; backward: base_out too."""
    args, rules, valid = draw(_lora_args(dims, device, base))
    for k in ("dropout_p", "seed"):
        args.pop(k)
        rules.pop(k)
    lead, N = args["x"].shape[:-1], args["B"].shape[0]
    args["g"] = draw(tensor((N,), FLOATS64, device=device))
    rules["g"] = Rule(FLOATS64)
    if base == "forward":
        args["bias"] = draw(st.none() | tensor((N,), FLOATS64, device=device))
        rules["bias"] = Rule(FLOATS64, optional=True)
    else:
        args["base_out"] = draw(tensor((*lead, N), FLOATS64, device=device))
        rules["base_out"] = Rule(FLOATS64)
    return args, rules, valid


@st.composite
def _a_times_w_t_args(draw, dims, device):
    """DoRA's A (r, K) and a dense weight (N, K) of any float dtype and layout (Conv1D's is a transposed view)."""
    r, K, N = draw(st.sampled_from(RANKS + (0,))), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    args = dict(A=draw(tensor((r, K), FLOATS64, device=device)), weight=draw(tensor((N, K), FLOATS64, device=device)))
    return args, dict(A=Rule(FLOATS64), weight=Rule(FLOATS64)), True


def _dora64(a) -> tuple:
    scale = kernel_scale(a["scale"], *(a.get(k) for k in ("x", "A", "base_out", "grad_y")))
    return d64(a["A"]), d64(a["B"]), d64(a["g"]), scale


def _dora_forward_ref(a):
    A, B, g, scale = _dora64(a)
    y, t = R.dora_forward(d64(a["x"]), d64(a["base_out"]), A, B, g, d64(a["bias"]), scale)
    return y.to(_dt(a, "base_out")), t.to(_dt(a, "A"))


def _dora_backward(a):
    return OPS.dora_backward(a["grad_y"], a["x"], a["base_out"], a["T"], a["A"], a["B"], a["g"], a["scale"],
                             a["grad_x_base"])


def _dora_backward_ref(a):
    A, B, g, scale = _dora64(a)
    grads = R.dora_backward(d64(a["grad_y"]), d64(a["x"]), d64(a["base_out"]), d64(a["T"]), A, B, g, scale,
                            d64(a["grad_x_base"]))
    return tuple(t.to(_dt(a, k)) for t, k in zip(grads, ("x", "A", "B", "g")))


@st.composite
def _merge_args(draw, dims, device, nf4=False):
    d, k, r = draw(st.sampled_from(dims)), draw(st.sampled_from(dims)), draw(st.sampled_from(RANKS))
    args = dict(A=draw(tensor((r, k), FLOATS64, device=device)), B=draw(tensor((d, r), FLOATS64, device=device)),
                scale=draw(SCALES))
    rules = dict(A=Rule(FLOATS64), B=Rule(FLOATS64))
    if nf4:
        state, state_rules = draw(nf4_state(d * k, device))
        args.update(state, shape=(d, k))
        rules.update(state_rules, shape=st.sampled_from([(d, k, 1), (d * k,), (-d, -k)]))
    else:
        args.update(W=draw(tensor((d, k), layouts="co", device=device)), sign=draw(st.sampled_from((1, -1))),
                    via=draw(st.sampled_from(("op", "public"))))
        rules["W"] = Rule(FLOATS, contiguous=True)
    return args, rules, True


_MERGES = {("op", 1): OPS.merge_lora_, ("op", -1): OPS.unmerge_lora_,
           ("public", 1): lora_ext.merge_lora_, ("public", -1): lora_ext.unmerge_lora_}


def _merge(a):
    _MERGES[a["via"], a["sign"]](a["W"], a["A"], a["B"], a["scale"])
    return a["W"]


def _merge_ref(a):
    (R.merge_lora_ if a["sign"] > 0 else R.unmerge_lora_)(a["W"], a["A"], a["B"], a["scale"])
    return a["W"]


def _merge_nf4(a, fn=OPS.merge_nf4):
    packed, absmax, bs, *nested = _state(a)
    return fn(packed, absmax, bs, list(a["shape"]), a["A"], a["B"], a["scale"], *nested)


def _merge_nf4_ref(a):
    return _merge_nf4(dict(a, shape=tuple(a["shape"])), R.merge_nf4)


# Mixed-adapter batches. The adapters are one argument per tensor (A0, B0, A1, ...: each its own spec, rule and
# meta twin); the plan is drawn as runs of rows of one adapter and built by lora_ext.multi_lora.plan in the call.
# Run lengths: decode (1), a BLAS group on the CPU (>= 16 rows), more than one tile (> 64).
RUN_LENGTHS = (1, 1, 2, 5, 17, 70)
# How the plan's rows and tiles reach the operator: as plan() makes them or strided (valid), or broken.
GOOD_HANDOVER = ("plan", "plan", "strided")
BAD_ROWS = ("int32", "float64", "2-D", "meta", "row M", "row -1", "a row twice", "more than M")
# ("one tile per adapter": counts past 64, which the kernels take but the plan's contract does not promise.)
BAD_TILES = ("int64", "(n, 2)", "meta", "overlap", "past the end", "count 0", "start -1", "adapter n", "adapter -1",
             "one tile per adapter")


@st.composite
def _adapters(draw, K: int, N: int, device: str) -> tuple:
    """(args, rules) of up to 4 adapters A{i} (r_i, K), B{i} (N, r_i): ranks differ, 0 is an adapter absent from
    the layer; every tensor has its own float dtype (the kernels take any mix)."""
    args, rules = {}, {}
    n = draw(st.sampled_from((2, 3, 1, 4, 0)))  # (hypothesis shrinks toward the first: several adapters)
    for i, r in enumerate(draw(st.lists(st.sampled_from(RANKS + (0,)), min_size=n, max_size=n))):
        args.update({f"A{i}": draw(tensor((r, K), FLOATS64, device=device)),
                     f"B{i}": draw(tensor((N, r), FLOATS64, device=device))})
        rules.update({f"A{i}": Rule(FLOATS64), f"B{i}": Rule(FLOATS64)})
    return args, rules


def _runs(n: int):
    """Runs (adapter, length) of consecutive rows, adapter -1 for none; rows past the last run have none."""
    run = st.tuples(st.integers(-1, n - 1), st.sampled_from(RUN_LENGTHS))
    return st.lists(run, min_size=1, max_size=6).map(tuple)


def _adapter_lists(a) -> tuple:
    n = sum(1 for k in a if re.fullmatch(r"A\d+", k))
    return [a[f"A{i}"] for i in range(n)], [a[f"B{i}"] for i in range(n)]


def _adapter_indices(runs, m: int) -> list:
    """Each of the first rows' adapter (at most m of them): the runs, cut to the input's m rows."""
    return [adapter for adapter, length in runs for _ in range(length)][:m]


def _bad_rows(rows: torch.Tensor, how: str, m: int) -> torch.Tensor:
    if how in ("int32", "float64"):
        return rows.to(getattr(torch, how))
    if how == "2-D":
        return rows[None]
    if how == "meta":
        return rows.to("meta")
    if how == "more than M":  # (a view: m may be past 2**31 in the big target)
        return torch.zeros(1, dtype=torch.int64).expand(m + 1)
    rows = rows.clone()
    if how == "row M" and rows.numel():
        rows[-1] = m
    elif how == "row -1" and rows.numel():
        rows[0] = -1
    elif how == "a row twice" and rows.numel() >= 2:
        rows[1] = rows[0]
    return rows


def _bad_tiles(tiles: torch.Tensor, how: str, n: int) -> torch.Tensor:
    if how == "int64":
        return tiles.long()
    if how == "(n, 2)":
        return tiles[:, :2]
    if how == "meta":
        return tiles.to("meta")
    if how == "overlap":
        return torch.cat([tiles, tiles[:1]])
    if how == "one tile per adapter":
        merged = {}
        for adapter, start, count in tiles.tolist():  # plan() lists an adapter's tiles consecutively
            merged.setdefault(adapter, [start, 0])[1] += count
        return torch.tensor([[k, *v] for k, v in merged.items()], dtype=torch.int32).reshape(-1, 3)
    tiles = tiles.clone()
    if tiles.numel():
        where, value = {"adapter n": ((0, 0), n), "adapter -1": ((0, 0), -1), "count 0": ((0, 2), 0),
                        "start -1": ((0, 1), -1), "past the end": ((-1, 2), tiles[-1, 2].item() + 1)}[how]
        tiles[where] = value
    return tiles


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, every other element of a twice longer last dimension."""
    return torch.stack([t, t], -1)[..., 0]


def _plan_tensors(a) -> tuple:
    """(rows, tiles) of plan() over the case's runs, handed over as a["rows"] and a["tiles"] say; on meta or fake
    inputs, tensors of their shapes and dtypes there (the fake kernel reads no values)."""
    x, (A, _) = a["x"], _adapter_lists(a)
    m = math.prod(x.shape[:-1])
    with unset_fake_temporarily():  # plan() reads values: not under the big target's FakeTensorMode
        p = lora_ext.multi_lora.plan(_adapter_indices(a["runs"], m), len(A))
        rows = _strided(p.rows) if a["rows"] == "strided" else p.rows
        tiles = _strided(p.tiles) if a["tiles"] == "strided" else p.tiles
        rows = rows if a["rows"] in GOOD_HANDOVER else _bad_rows(rows, a["rows"], m)
        tiles = tiles if a["tiles"] in GOOD_HANDOVER else _bad_tiles(tiles, a["tiles"], len(A))
    if x.device.type != "cpu" or isinstance(x, FakeTensor):
        rows, tiles = (x.new_empty(t.shape, dtype=t.dtype) for t in (rows, tiles))
    return rows, tiles


@st.composite
def _multi_lora_args(draw, dims, device):
    """y (..., N) += scales[a] x_i A[a]^T B[a]^T on each planned row i of x (..., K), in place."""
    lead, K, N = draw(shapes(dims, 0, 2)), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    adapters, rules = draw(_adapters(K, N, device))
    n = len(adapters) // 2
    scales = tuple(draw(st.lists(SCALES, min_size=n, max_size=n)))
    args = dict(y=draw(tensor((*lead, N), FLOATS64, "co", device=device)),
                x=draw(tensor((*lead, K), FLOATS64, device=device)), **adapters, scales=scales, runs=draw(_runs(n)),
                rows=draw(st.sampled_from(GOOD_HANDOVER)), tiles=draw(st.sampled_from(GOOD_HANDOVER)))
    rules.update(y=Rule(FLOATS64, contiguous=True), x=Rule(FLOATS64), rows=st.sampled_from(BAD_ROWS),
                 tiles=st.sampled_from(BAD_TILES),
                 scales=st.sampled_from([scales + (1.0,), scales[:-1]][:1 + bool(n)]))  # one more, one fewer
    return args, rules, True


def _multi_lora(a):
    A, B = _adapter_lists(a)
    OPS.multi_lora_forward_(a["y"], a["x"], A, B, list(a["scales"]), *_plan_tensors(a))
    return a["y"]


def _multi_scales(a, scales, *operands) -> list:
    """The scales as the kernels round them (fp32 unless an operand is fp64); |s| for the magnitude oracle."""
    return [kernel_scale(abs(s) if "_magnitudes" in a else s, *operands) for s in scales]


def _multi_lora_ref(a):
    """fp64 copies of y and the adapters, y rounded once to its dtype."""
    A, B = _adapter_lists(a)
    y = a["y"].double()  # (a fresh copy of y: the oracle may write into it)
    R.multi_lora_forward_(y, d64(a["x"]), [d64(t) for t in A], [d64(t) for t in B],
                          _multi_scales(a, a["scales"], a["x"], a["y"], *A, *B), *_plan_tensors(a))
    return y.to(_dt(a, "y"))


def _call(fn, *names) -> Callable:
    return lambda a: fn(*(a[n] for n in names))


OPERATORS = [
    Op("quantize_nf4", _quantize_args, _call(OPS.quantize_nf4, "A", "blocksize"),
       _call(R.quantize_nf4, "A", "blocksize"), exact, lambda a: _nf4_out_shapes(a["A"].numel(), a["blocksize"])),
    Op("double_quant", _double_quant_args, _call(OPS.double_quant, "absmax", "code", "blocksize"),
       _call(R.double_quant, "absmax", "code", "blocksize"), exact,
       lambda a: (_like((a["absmax"].numel(),), torch.uint8),
                  _like((-(-a["absmax"].numel() // a["blocksize"]),), torch.float32), _like((), torch.float32))),
    Op("dequantize_nf4", _dequantize_args, _dequantize, _dequantize_ref, exact,
       lambda a: _like(a["shape"], getattr(torch, a["dtype"]))),
    Op("dequantize_nf4_out", lambda dims, device: _dequantize_args(dims, device, out=True), _dequantize_out,
       lambda a: _dequantize_out(a, R.dequantize_nf4_out), exact, lambda a: a["out"], mutable=("out",)),
    Op("nf4_linear", _linear_args, _nf4_linear, lambda a: _nf4_linear_ref(a).to(_dt(a, "x")), close,
       lambda a: _like((*a["x"].shape[:-1], a["out_features"]), a["x"].dtype)),
    Op("nf4_linear_grad_input", lambda dims, device: _linear_args(dims, device, grad_input=True), _grad_input,
       _grad_input_ref, close, lambda a: _like((*a["x"].shape[:-1], a["in_features"]), a["x"].dtype)),
    Op("lora_dropout", _dropout_args, _call(OPS.lora_dropout, "x", "p", "seed"),
       _call(R.lora_dropout, "x", "p", "seed"), exact, lambda a: _like(a["x"].shape, a["x"].dtype)),
    Op("lora_forward", _lora_args, lambda a: OPS.lora_forward(a["x"], a["base_out"], *_branch(a)), _lora_forward_ref,
       close, lambda a: _lora_shapes(a, a["base_out"].shape, a["base_out"].dtype)),
    Op("lora_backward", lambda dims, device: _lora_args(dims, device, "backward"), _lora_backward,
       _lora_backward_ref, close,
       lambda a: tuple(_like(a[k].shape, a[k].dtype) for k in ("x", "A", "B"))),
    Op("lora_linear", lambda dims, device: _lora_args(dims, device, "linear"),
       lambda a: OPS.lora_linear(a["x"], a["weight"], a["bias"], *_branch(a)), _lora_linear_ref, close,
       lambda a: _lora_shapes(a, (*a["x"].shape[:-1], a["weight"].shape[0]), a["x"].dtype)),
    Op("lora_nf4_linear", lambda dims, device: _lora_args(dims, device, "nf4"), _lora_nf4, _lora_nf4_ref, close,
       lambda a: _lora_shapes(a, (*a["x"].shape[:-1], a["out_features"]), a["x"].dtype)),
    Op("dora_forward", _dora_args,
       lambda a: OPS.dora_forward(a["x"], a["base_out"], a["A"], a["B"], a["g"], a["bias"], a["scale"]),
       _dora_forward_ref, close, lambda a: _lora_shapes(a, a["base_out"].shape, a["base_out"].dtype)),
    Op("dora_backward", lambda dims, device: _dora_args(dims, device, "backward"), _dora_backward, _dora_backward_ref,
       close, lambda a: tuple(_like(a[k].shape, a[k].dtype) for k in ("x", "A", "B", "g"))),
    Op("dora_a_times_w_t", _a_times_w_t_args, _call(OPS.dora_a_times_w_t, "A", "weight"),
       _call(R.dora_a_times_w_t, "A", "weight"), close,
       lambda a: _like((a["A"].shape[0], a["weight"].shape[0]),
                       torch.float64 if torch.float64 in (a["A"].dtype, a["weight"].dtype) else torch.float32)),
    Op("merge_lora_", _merge_args, _merge, _merge_ref, exact, lambda a: a["W"], mutable=("W",)),
    Op("merge_nf4", lambda dims, device: _merge_args(dims, device, nf4=True), _merge_nf4, _merge_nf4_ref, exact,
       lambda a: _nf4_out_shapes(math.prod(a["shape"]), a["blocksize"])),
    Op("multi_lora_forward_", _multi_lora_args, _multi_lora, _multi_lora_ref, close, lambda a: a["y"],
       mutable=("y",)),
]
OPS_BY_NAME = {op.name: op for op in OPERATORS}


def run_op(case: Case) -> None:
    op = OPS_BY_NAME[case.target]
    check(case, op.call, op.oracle, op.compare, op.mutable)


def run_big(case: Case) -> None:
    """Sizes past 2**31 elements on meta or FakeTensorMode tensors: the fake kernel answers with the formula's
    shapes and dtypes, or a clear error (never for a valid case); it never reads data."""
    op = OPS_BY_NAME[dict(case.args)["op"]]
    fake = any(v.device == "fake" for v in case.specs())
    with FakeTensorMode() if fake else contextlib.nullcontext():
        a = materialize(case)
        try:
            out = op.call(a)
        except ERRORS as e:
            refused(case, e, a)
            return
        # The dtype of what the real kernel would refuse means nothing (torch's meta linear promotes a float64
        # bias where the CPU one raises); the shape must still be the formula's.
        _same_shapes(out, op.shapes(a), dtypes=case.valid)


@st.composite
def _big_cases(draw):
    op = draw(st.sampled_from(OPERATORS))
    device = draw(st.sampled_from(("meta", "fake")))
    return draw(as_cases("big", op.builder, BIG_DIMS, device, extra=(("op", op.name),)))


# ---------------------------------------------------------------- the public functions


STORAGES = st.sampled_from(("uint8", "int8", "float16", "bfloat16", "float32"))
BAD_STORAGES = st.sampled_from(("int32", "float64", "bool"))


def _storage_fits(n: int, storage: str) -> bool:
    """Whether the (n+1)//2 packed bytes fill whole elements of the storage dtype (quant_storage's contract)."""
    return ((n + 1) // 2) % torch.empty((), dtype=getattr(torch, storage)).element_size() == 0


@st.composite
def _quantize_public_args(draw, dims, device):
    w = draw(tensor(draw(shapes(dims, 0, 3))))
    args = dict(w=w, blocksize=draw(st.sampled_from(VALID_BS)), double_quant=draw(st.booleans()),
                quant_storage=draw(STORAGES), dtype=draw(st.sampled_from((None,) + FLOATS)))
    rules = dict(w=Rule(FLOATS), blocksize=BAD_BS | st.sampled_from((64.0, "64", True)), quant_storage=BAD_STORAGES,
                 dtype=st.sampled_from(("float64", "int32", "bool")))
    return args, rules, _storage_fits(math.prod(w.shape), args["quant_storage"])


def _ref_nf4(w: torch.Tensor, blocksize: int, double_quant: bool) -> dict:
    """The reference's NF4 state of w, as nf4_state's keys."""
    packed, absmax = R.quantize_nf4(w, blocksize)
    state = dict(packed=packed, absmax=absmax, blocksize=blocksize, nested_absmax=None, nested_code=None,
                 offset=None, nested_blocksize=256)
    if double_quant:
        code = R.dynamic_map()
        q, nested, offset = R.double_quant(absmax, code, 256)
        state.update(absmax=q, nested_absmax=nested, nested_code=code, offset=offset)
    return state


def _ref_linear(x: torch.Tensor, s: dict, out_features: int, bias) -> torch.Tensor:
    """x W^T (+ bias) in fp64, W the NF4 state s (x and bias: fp64, may require grad)."""
    return R.nf4_linear(x, s["packed"], s["absmax"], out_features, s["blocksize"], bias, *_nested(s),
                        compute_dtype=torch.float64)


def _qw_fields(qw: lora_ext.NF4Weight) -> tuple:
    return (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_code, qw.offset, qw.blocksize, qw.nested_blocksize,
            qw.data.dtype, tuple(qw.shape), qw.dtype)


def _ref_fields(w: torch.Tensor, a: dict) -> tuple:
    """_qw_fields of the reference's quantization of w with a's blocksize, double_quant and quant_storage."""
    s = _ref_nf4(w, a["blocksize"], a["double_quant"])
    return (s["packed"], s["absmax"], s["nested_absmax"], s["nested_code"], s["offset"], a["blocksize"], 256,
            getattr(torch, a["quant_storage"]), tuple(w.shape), w.dtype)


def _quantize_public(a):
    qw = lora_ext.quantize_nf4(a["w"], a["blocksize"], a["double_quant"], getattr(torch, a["quant_storage"]))
    dtype = None if a["dtype"] is None else getattr(torch, a["dtype"])
    return _qw_fields(qw), lora_ext.dequantize_nf4(qw, dtype)


def _quantize_public_ref(a):
    w, s = a["w"], _ref_nf4(a["w"], a["blocksize"], a["double_quant"])
    dtype = w.dtype if a["dtype"] is None else getattr(torch, a["dtype"])
    return _ref_fields(w, a), R.dequantize_nf4(*(s[k] for k in _NF4_KEYS[:3]), w.shape, dtype, *_nested(s))


@st.composite
def _nf4_linear_public_args(draw, dims, device):
    lead, K, N = draw(shapes(dims, 0, 2)), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    x = draw(tensor((*lead, K), FLOATS64))
    args = dict(weight=draw(tensor((N, K))), blocksize=draw(st.sampled_from(VALID_BS)),
                double_quant=draw(st.booleans()), x=x, bias=draw(st.none() | tensor((N,), (x.dtype,))),
                grad=draw(st.booleans()))
    return args, dict(x=Rule(FLOATS64), bias=Rule((x.dtype,), optional=True)), True


def _with_grads(y: torch.Tensor, leaves: list, like: list, positive: bool = False) -> tuple:
    """(y, then the gradient of each leaf that requires grad, cast to the dtype of its match in `like` (the
    tensors as drawn), for a fixed non-uniform dy rounded to like[0]'s dtype, the output's; positive: |dy|)."""
    pairs = [(t, m) for t, m in zip(leaves, like) if t is not None and t.requires_grad]
    if pairs:
        dy = torch.sin(torch.arange(y.numel(), dtype=torch.float64)).view(y.shape).to(like[0].dtype)
        y.backward((dy.abs() if positive else dy).to(y.dtype))
    return (y.detach(), *(t.grad.to(m.dtype) for t, m in pairs))


def _needs_grad(t, flag: bool):
    return t if t is None or not flag else t.detach().requires_grad_(True)


def _nf4_linear_public(a):
    qw = lora_ext.quantize_nf4(a["weight"], a["blocksize"], a["double_quant"])
    x, bias = _needs_grad(a["x"], a["grad"]), _needs_grad(a["bias"], a["grad"])
    return _with_grads(lora_ext.nf4_linear(x, qw, bias), [x, bias], [x, bias])


def _nf4_linear_public_ref(a):
    s = _ref_nf4(a["weight"], a["blocksize"], a["double_quant"])
    x, bias = _needs_grad(d64(a["x"]), a["grad"]), _needs_grad(d64(a["bias"]), a["grad"])
    y = _ref_linear(x, s, a["weight"].shape[0], bias)
    return (y.to(_dt(a, "x")),) + _with_grads(y, [x, bias], [a["x"], a["bias"]], "_magnitudes" in a)[1:]


@st.composite
def _lora_linear_public_args(draw, dims, device):
    """lora_ext.lora_linear over a dense or an NF4 weight, forward and (when grad) backward."""
    args, rules, ok = draw(_lora_args(dims, device, "linear"))
    for k in ("scale", "dropout_p", "seed"):
        del args[k]
    rules.pop("seed")
    rules["dropout"] = rules.pop("dropout_p")
    grad = draw(st.booleans())
    # No NaN scale with gradients: over an empty batch autograd's (dy s)^T T is 0, the kernels' s (dy^T T) NaN.
    args.update(scaling=draw(FINITE_SCALES if grad else SCALES), dropout=draw(GOOD_P), training=draw(st.booleans()),
                rng=draw(st.integers(0, 99)), nf4=draw(st.booleans()), blocksize=draw(st.sampled_from(VALID_BS)),
                double_quant=draw(st.booleans()), grad=grad, weight_grad=draw(st.booleans()))
    if args["nf4"] and args["weight"].dtype == "float64":
        args["weight"] = replace(args["weight"], dtype="float32")  # quantize_nf4 takes fp32/fp16/bf16
    return args, rules, ok


def _lora_linear_public(a):
    weight = lora_ext.quantize_nf4(a["weight"], a["blocksize"], a["double_quant"]) if a["nf4"] else \
        _needs_grad(a["weight"], a["weight_grad"])
    x, A, B = (_needs_grad(a[k], a["grad"]) for k in ("x", "A", "B"))
    torch.manual_seed(a["rng"])
    y = lora_ext.lora_linear(x, weight, A, B, a["scaling"], a["bias"], a["dropout"], a["training"])
    leaves = [x, A, B, weight if isinstance(weight, torch.Tensor) else None]
    return _with_grads(y, leaves, leaves)


def _lora_linear_public_ref(a):
    torch.manual_seed(a["rng"])
    p, seed = _dropout_seed(a["dropout"], a["training"])
    x, A, B = (_needs_grad(d64(a[k]), a["grad"]) for k in ("x", "A", "B"))
    if a["nf4"]:
        s = _ref_nf4(a["weight"], a["blocksize"], a["double_quant"])
        base, weight = _ref_linear(x, s, a["weight"].shape[0], d64(a["bias"])), None
    else:
        weight = _needs_grad(d64(a["weight"]), a["weight_grad"])
        base = torch.nn.functional.linear(x, weight, d64(a["bias"]))
    y, _ = R.lora_forward(x, base, A, B, kernel_scale(a["scaling"], a["x"], a["A"]), p, seed)
    like = [a[k] for k in ("x", "A", "B", "weight")]
    return (y.to(_dt(a, "x")),) + _with_grads(y, [x, A, B, weight], like, "_magnitudes" in a)[1:]


@st.composite
def _nf4_layer_args(draw, dims, device):
    """NF4Linear.from_linear of an nn.Linear with these weight and bias, then its forward on x."""
    lead, K, N = draw(shapes(dims, 0, 2)), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    dt = draw(st.sampled_from(FLOATS))
    args = dict(weight=draw(tensor((N, K), (dt,))), bias=draw(st.none() | tensor((N,), (dt,))),
                blocksize=draw(st.sampled_from(VALID_BS)), double_quant=draw(st.booleans()),
                quant_storage=draw(STORAGES), x=draw(tensor((*lead, K), FLOATS64)))
    rules = dict(weight=Rule((dt,), reshape=False), x=Rule(FLOATS64), blocksize=BAD_BS, quant_storage=BAD_STORAGES)
    return args, rules, _storage_fits(N * K, args["quant_storage"])


def _linear(weight: torch.Tensor, bias) -> nn.Linear:
    """An nn.Linear whose parameters are these tensors (same storage)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _nf4_layer(a):
    layer = lora_ext.NF4Linear.from_linear(_linear(a["weight"], a["bias"]), a["blocksize"], a["double_quant"],
                                           getattr(torch, a["quant_storage"]))
    return _qw_fields(layer.qweight), layer(a["x"])


def _nf4_layer_ref(a):
    w, x = a["weight"], a["x"]
    bias = None if a["bias"] is None else a["bias"].to(x.dtype).double()  # the layer adds the bias in x's dtype
    y = _ref_linear(d64(x), _ref_nf4(w, a["blocksize"], a["double_quant"]), w.shape[0], bias)
    return _ref_fields(w, a), y.to(x.dtype)


def _compare_fields_exact_y_close(out, expected, a, magnitude=None):
    exact(out[0], expected[0], a)
    close(out[1], expected[1], a, magnitude and (lambda: magnitude()[1]))


@st.composite
def _merge_nf4_public_args(draw, dims, device):
    args, rules, ok = draw(_merge_args(dims, device, nf4=True))
    del rules["shape"]
    return args, rules, ok and len(args["shape"]) == 2


def _nf4_weight(a) -> lora_ext.NF4Weight:
    packed, absmax, bs, *nested = _state(a)
    return lora_ext.NF4Weight(packed, absmax, torch.Size(a["shape"]), torch.float32, bs, *nested)


def _merge_nf4_public(a):
    new, err = lora_ext.merge_nf4(_nf4_weight(a), a["A"], a["B"], a["scale"])
    return new.packed, new.absmax, new.nested_absmax, new.offset, type(err).__name__


def _merge_nf4_public_ref(a):
    return (*merge_nf4_reference(_nf4_weight(a), a["A"], a["B"], a["scale"]), "MergeError")


# Under what lora_ext.multi_lora_linear runs: it computes no gradient ("grad": an input requires one, refused).
_GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": contextlib.nullcontext}


@st.composite
def _multi_lora_linear_public_args(draw, dims, device):
    """lora_ext.multi_lora_linear over a dense weight, an nn.Linear (its own bias) or an NF4 weight; one scaling
    or one per adapter; adapter_indices as a list, a tensor or a plan."""
    lead, K, N = draw(shapes(dims, 0, 2)), draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    x = draw(tensor((*lead, K), FLOATS64))
    adapters, rules = draw(_adapters(K, N, "cpu"))
    n = len(adapters) // 2
    base = draw(st.sampled_from(("weight", "module", "nf4")))
    args = dict(x=x, weight=draw(tensor((N, K), FLOATS if base == "nf4" else (x.dtype,))), base=base,
                bias=draw(st.none() | tensor((N,), (x.dtype,))), blocksize=draw(st.sampled_from(VALID_BS)),
                double_quant=draw(st.booleans()), **adapters,
                scaling=draw(SCALES | st.lists(SCALES, min_size=n, max_size=n).map(tuple)), runs=draw(_runs(n)),
                indices=draw(st.sampled_from(("list", "tensor", "int32", "plan"))),
                mode=draw(st.sampled_from(("no_grad", "inference_mode"))))
    # A module's own weight and bias, and their devices, are its forward's business (accelerate offloads weights
    # to meta and loads them in a hook): torch's nn.Linear takes a meta input beside CPU weights, or a meta weight
    # beside a CPU input (and returns uninitialized CPU memory). A bias of another float dtype is at::linear's
    # business (as in _lora_args); an NF4 base's bias has x's dtype (nf4_linear's rule).
    module = base == "module"
    rules.update(x=Rule(FLOATS64, meta=not module),
                 weight=Rule((args["weight"].dtype,), reshape=False, meta=not module),
                 scaling=st.sampled_from([(1.0,) * (n + 1), (1.0,) * (n - 1)][:1 + bool(n)]),
                 indices=st.sampled_from(("one short", "one more", "adapter n", "adapter -2", "float",
                                          "plan for n+1")),
                 mode=st.just("grad"))
    if module:
        rules["base"] = st.just("module and bias")
    else:
        rules["bias"] = Rule((x.dtype,) if base == "nf4" else FLOATS64, optional=True)
    return args, rules, True


def _multi_indices(a, m: int, n: int):
    """adapter_indices as a["indices"] says: one per row (the runs, then -1), or a way to break them."""
    idx = _adapter_indices(a["runs"], m)
    idx += [-1] * (m - len(idx))
    how = a["indices"]
    if how in ("adapter n", "adapter -2") and idx:
        idx[0] = n if how == "adapter n" else -2
    if how in ("plan", "plan for n+1"):
        return lora_ext.multi_lora.plan(idx, n + (how == "plan for n+1"))
    if how in ("one short", "one more"):
        return idx[:-1] if how == "one short" else idx + [-1]
    dtype = {"tensor": torch.int64, "int32": torch.int32, "float": torch.float32}.get(how)
    return idx if dtype is None else torch.tensor(idx, dtype=dtype)


def _multi_lora_linear_public(a):
    A, B = _adapter_lists(a)
    x, bias = a["x"], a["bias"]
    if a["mode"] == "grad" and x.is_floating_point():
        x = x.detach().requires_grad_(True)
    if a["base"] == "nf4":
        base = lora_ext.quantize_nf4(a["weight"], a["blocksize"], a["double_quant"])
    elif a["base"] == "weight":
        base = a["weight"]
    else:  # a module with its own bias ("module and bias": the bias given to the function too, refused)
        base = _linear(a["weight"], a["bias"])
        bias = bias if a["base"] == "module and bias" else None
    indices = _multi_indices(a, math.prod(x.shape[:-1]), len(A))
    with _GRAD_MODES[a["mode"]]():
        return lora_ext.multi_lora_linear(x, base, A, B, a["scaling"], indices, bias)


def _multi_lora_linear_public_ref(a):
    """The base (the reference's NF4 weight for nf4), then the adapters, in fp64; rounded once to y's dtype."""
    A, B = _adapter_lists(a)
    x, bias, n = d64(a["x"]), d64(a["bias"]), len(A)
    if a["base"] == "nf4":
        y = _ref_linear(x, _ref_nf4(a["weight"], a["blocksize"], a["double_quant"]), a["weight"].shape[0], bias)
        y_like = a["x"]
    else:
        y = torch.nn.functional.linear(x, d64(a["weight"]), bias)
        y_like = torch.nn.functional.linear(a["x"], a["weight"], a["bias"])  # (at::linear's dtype rule)
    scaling = a["scaling"] if isinstance(a["scaling"], tuple) else (a["scaling"],) * n
    idx = _multi_indices(dict(a, indices="list"), math.prod(x.shape[:-1]), n)
    return R.multi_lora_forward(y, x, [d64(t) for t in A], [d64(t) for t in B],
                                _multi_scales(a, scaling, a["x"], y_like, *A, *B), idx).to(y_like.dtype)


# ---------------------------------------------------------------- LoraLinear: construct, forward, merge, unmerge


# DoRA (use_dora=True): the magnitude drawn positive (abs) with SPECIALS, times one of these (1e30: g overflows
# fp16 decisively, 1e-30: the merged fp16 weight underflows); use_dora must be a bool, anything else a TypeError.
DORA_M_SCALES = (1.0, 1.0, 1e-30, 1e30)
BAD_USE_DORA = st.sampled_from((1, 0, "yes", None, 1.0))


@st.composite
def _lora_layer_args(draw, dims, device):
    lead = draw(shapes(dims, 0, 2))
    K, N = draw(st.sampled_from(dims[:4] + (33,))), draw(st.sampled_from(dims[:4] + (65,)))
    r, dt = draw(st.integers(1, min(K, N, 8))), draw(st.sampled_from(FLOATS))
    args = dict(weight=draw(tensor((N, K), (dt,), "co")), bias=draw(st.none() | tensor((N,), (dt,))),
                nf4=draw(st.booleans()), blocksize=draw(st.sampled_from(VALID_BS[:3])), r=r,
                lora_alpha=draw(st.sampled_from((0, 1, 8, 16, 0.5, 1e3))), lora_dropout=draw(GOOD_P),
                use_rslora=draw(st.booleans()), init=draw(st.sampled_from((True, False, "gaussian"))),
                A=draw(tensor((r, K), ("float32",))), B=draw(tensor((N, r), ("float32",))),
                x=draw(tensor((*lead, K), (dt,))), training=draw(st.booleans()), rng=draw(st.integers(0, 99)),
                safe_merge=draw(st.booleans()), use_dora=draw(st.booleans()))
    if args["use_dora"]:  # the magnitude to set after A and B (None: the layer's initial ||W + s B A||), times m_scale
        args.update(magnitude=draw(tensor((N,), ("float32",), "c", "abs")) if draw(st.integers(0, 3)) else None,
                    m_scale=draw(st.sampled_from(DORA_M_SCALES)))
    rules = dict(r=st.sampled_from((0, -1, 10**6, 2.5, True, "8", None)),
                 lora_alpha=st.sampled_from((-1.0, NAN, -INF, "8")), lora_dropout=BAD_P,
                 init=st.sampled_from(("bogus", 3, None)), x=Rule((dt,)),
                 weight=Rule((dt,), contiguous=True, reshape=False), use_dora=BAD_USE_DORA)
    return args, rules, True


def _module_state(m: nn.Module) -> dict:
    """Bytes (CPU tensors), requires_grad, dtype and shape of every parameter and buffer."""
    return {k: (_bytes(t) if t.device.type == "cpu" else None, t.requires_grad, t.dtype, t.shape)
            for k, t in [*m.named_parameters(), *m.named_buffers()]}


def _assert_state(m: nn.Module, before: dict, what: str) -> None:
    after = _module_state(m)
    assert after.keys() == before.keys(), f"{what}: the base's tensors changed"
    for k, (raw, *meta) in before.items():
        assert after[k][1:] == tuple(meta), f"{what}: {k}'s metadata changed"
        assert raw is None or torch.equal(after[k][0], raw), f"{what}: {k} changed"


def _scaling(a) -> float:
    return a["lora_alpha"] / math.sqrt(a["r"]) if a["use_rslora"] else a["lora_alpha"] / a["r"]


def _layer_forward_ref(a, lora, base_state) -> torch.Tensor:
    torch.manual_seed(a["rng"])
    p, seed = _dropout_seed(a["lora_dropout"], a["training"])
    x, bias = d64(a["x"]), base_state.get("bias")
    bias = None if bias is None else bias.to(a["x"].dtype).double()
    if a["nf4"]:
        q = lora.base_layer.qweight
        base = R.nf4_linear(x, q.packed, q.absmax, q.shape[0], q.blocksize, bias, q.nested_absmax, q.nested_code,
                            q.offset, q.nested_blocksize, compute_dtype=torch.float64)
    else:
        base = torch.nn.functional.linear(x, d64(base_state["weight"]), bias)
    scale = kernel_scale(_scaling(a), a["x"], a["A"])
    return R.lora_forward(x, base, d64(a["A"]), d64(a["B"]), scale, p, seed)[0].to(a["x"].dtype)


def run_lora_layer(case: Case) -> None:
    """LoraLinear over nn.Linear or NF4Linear: construction (a refusal leaves the base as it was), scaling,
    forward against the reference, merge (dense: merge_lora_'s reference bits; NF4: merge_nf4_reference's;
    safe_merge refuses exactly when the merged weight is not finite) and unmerge (dense: unmerge's bits; NF4:
    the original packed weight). With use_dora (a bool, anything else a TypeError), a drawn magnitude and DoRA's
    fp64 oracle (_dora_forward_ref, _dora_merge)."""
    a = materialize(case)
    base = _linear(a["weight"], a["bias"])
    try:
        if a["nf4"]:  # (a weight of another dtype is refused here already)
            base = lora_ext.NF4Linear.from_linear(base, a["blocksize"], double_quant=True)
    except ERRORS as e:
        refused(case, e, a, "NF4 base")
        return
    before = _module_state(base)
    dora = {"use_dora": a["use_dora"]} if "use_dora" in a else {}  # (cases kept from before DoRA have no use_dora)
    try:
        lora = lora_ext.LoraLinear(base, r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=a["lora_dropout"],
                                   use_rslora=a["use_rslora"], init_lora_weights=a["init"], **dora)
    except ERRORS as e:
        _assert_state(base, before, "after a refused LoraLinear(...)")
        refused(case, e, a, "LoraLinear")
        if not isinstance(dora.get("use_dora", False), bool):
            _bad_use_dora_refused(a, base, before, e)
        return
    assert isinstance(dora.get("use_dora", False), bool), f"LoraLinear accepted use_dora={a['use_dora']!r}"
    assert lora.scaling == _scaling(a) == lora_ext.lora_scaling(a["r"], a["lora_alpha"], a["use_rslora"])
    m = lora.lora_magnitude_vector
    if a.get("use_dora"):
        assert lora.use_dora is True and isinstance(m, nn.Parameter) and m.requires_grad, "no trainable magnitude"
        assert (m.shape, m.dtype) == ((a["weight"].shape[0],), torch.float32), f"magnitude {m.shape} {m.dtype}"
    else:
        assert lora.use_dora is False and m is None, "a LoRA layer without DoRA holds a magnitude"
    with torch.no_grad():
        lora.lora_A.copy_(a["A"])
        lora.lora_B.copy_(a["B"])
        if a.get("magnitude") is not None and m.device.type == "cpu":
            m.copy_(a["magnitude"] * a["m_scale"])
    lora.train(a["training"])
    base_state = {k: t.detach().clone() for k, t in base.named_parameters()}
    _layer_forward(case, a, lora, base_state)
    if a["weight"].device.type == "cpu":  # (a meta weight: the forward had to refuse it, nothing to merge)
        _layer_merge(case, a, lora, base_state)


def _bad_use_dora_refused(a, base, before, e) -> None:
    """A use_dora that is not a bool is refused with a TypeError that names it, unless another argument is at fault
    too (then the same layer with use_dora=False is refused as well)."""
    if isinstance(e, TypeError) and "use_dora" in str(e):
        return
    try:
        lora_ext.LoraLinear(base, r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=a["lora_dropout"],
                            use_rslora=a["use_rslora"], init_lora_weights=a["init"], use_dora=False)
    except ERRORS:
        _assert_state(base, before, "after a refused LoraLinear(...)")
        return
    raise AssertionError(f"use_dora={a['use_dora']!r} was refused without a TypeError that names it: "
                         f"{type(e).__name__}: {e}")


# DoRA's fp64 oracle. g = m / ||W + s B A|| per output row (W dense, or the NF4 base dequantized), in fp64. The
# layer takes the norm in fp32 as ||W_i||^2 + 2 s B_i A W_i^T + s^2 B_i A A^T B_i^T, which cancels: its error is
# about eps32 * M_i, M_i = || |W_i| + |s| |B_i| |A| ||^2, so g may be off by about |g| M_i / ||W_i + s B_i A||^2
# relative; the bounds below (close's magnitude) take |g| (1 + M_i / norm^2) for g.


def _dora_weight64(a, lora, base_state, qweight=None) -> torch.Tensor:
    """The base weight (out x in) in fp64: dense as it was before the forward, or the NF4 weight dequantized."""
    if not a["nf4"]:
        return d64(base_state["weight"])
    q = lora.base_layer.qweight if qweight is None else qweight
    return R.dequantize_nf4(q.packed, q.absmax, q.blocksize, q.shape, torch.float64, q.nested_absmax, q.nested_code,
                            q.offset, q.nested_blocksize, compute_dtype=torch.float64)


def _dora_g(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, m: torch.Tensor) -> tuple:
    """(g, a bound on |g| and its error, W + s B A), all fp64."""
    V = W + s * (B @ A)
    n = V.norm(dim=1)
    g = m / n
    M = (W.abs() + abs(s) * (B.abs() @ A.abs())).norm(dim=1).square()
    return g, g.abs() * (1 + M / n.square()), V


def _dora_forward_ref(a, lora, base_state, m: torch.Tensor, bound: bool = False) -> torch.Tensor:
    """Without dropout: g (x W^T + s x A^T B^T) + bias; with it: x W^T + bias + (g - 1) xd W^T + g s xd A^T B^T,
    xd the dropped-out x (PEFT's). bound: the same over absolute values, with g's bound (close's magnitude)."""
    torch.manual_seed(a["rng"])
    p, seed = _dropout_seed(a["lora_dropout"], a["training"])
    x, bias = d64(a["x"]), base_state.get("bias")
    bias = None if bias is None else bias.to(a["x"].dtype).double()
    W, A, B = _dora_weight64(a, lora, base_state), d64(a["A"]), d64(a["B"])
    g, g_bound, _ = _dora_g(W, A, B, _scaling(a), m.double())
    s = kernel_scale(_scaling(a), a["x"], a["A"])
    if bound:
        x, W, A, B, s, g = x.abs(), W.abs(), A.abs(), B.abs(), abs(s), g_bound
        bias = None if bias is None else bias.abs()
    xd = x if p == 0.0 else R.lora_dropout(x, p, seed)
    base, lora_out = xd @ W.t(), s * ((xd @ A.t()) @ B.t())
    if p == 0.0:
        y = g * (base + lora_out)
    else:
        y = x @ W.t() + (g + 1 if bound else g - 1) * base + g * lora_out
    y = y if bias is None else y + bias
    return y if bound else y.to(a["x"].dtype)


def _layer_forward(case, a, lora, base_state) -> None:
    before = _module_state(lora)
    m = lora.lora_magnitude_vector.detach().clone() if a.get("use_dora") else None
    torch.manual_seed(a["rng"])
    try:
        y = lora(a["x"])
    except ERRORS as e:
        _assert_state(lora, before, "after a refused forward")
        refused(case, e, a, "forward")
        return
    devices = {a["x"].device.type, a["weight"].device.type}
    assert devices == {y.device.type}, f"a forward over tensors on {sorted(devices)} gave a {y.device} output"
    if devices == {"cpu"} and a.get("use_dora"):
        close(y.detach(), _dora_forward_ref(a, lora, base_state, m), a,
              lambda: _dora_forward_ref(a, lora, base_state, m, bound=True))
    elif devices == {"cpu"}:
        close(y.detach(), _layer_forward_ref(a, lora, base_state), a,
              lambda: _layer_forward_ref(magnitudes(a), lora, magnitudes(base_state)))


def _layer_merge(case, a, lora, base_state) -> None:
    if a.get("use_dora"):
        return _dora_merge(case, a, lora, base_state)
    base = lora.base_layer
    q0 = base.qweight if a["nf4"] else None
    scaling = _scaling(a)
    if a["nf4"]:
        expected = merge_nf4_reference(q0, a["A"], a["B"], scaling)  # (packed, absmax, nested_absmax, offset)
        merged = R.dequantize_nf4(*expected[:2], q0.blocksize, q0.shape, torch.float32, expected[2], q0.nested_code,
                                  expected[3], q0.nested_blocksize)
    else:
        merged = base_state["weight"].clone()
        R.merge_lora_(merged, a["A"], a["B"], scaling)
    unsafe = a["safe_merge"] and not torch.isfinite(merged).all()
    if not _merged(case, a, lora, unsafe):
        return
    if a["nf4"]:
        q = base.qweight
        exact((q.packed, q.absmax, q.nested_absmax, q.offset), expected, a)
        lora.unmerge()
        exact(base.qweight.packed, q0.packed, a)
        exact(base.qweight.absmax, q0.absmax, a)
    else:
        exact(base.weight.detach(), merged, a)
        lora.unmerge()
        R.unmerge_lora_(merged, a["A"], a["B"], scaling)
        exact(base.weight.detach(), merged, a)


def _merged(case, a, lora, unsafe: bool) -> bool:
    """merge(): True when it merged (never an unsafe weight under safe_merge); False when it refused with a clear
    error, the layer as it was (not marked merged), and a reason to refuse."""
    before = _module_state(lora)
    try:
        lora.merge(safe_merge=a["safe_merge"])
    except ERRORS as e:
        check_error(e, ["safe_merge", *a])
        _assert_state(lora, before, "after a refused merge")
        assert not lora.merged and lora.merge_error is None, "a refused merge left the layer marked merged"
        assert unsafe or not case.valid, f"refused a merge: {type(e).__name__}: {e}"
        return False
    assert not unsafe, "safe_merge let a non-finite weight through"
    return True


def _dora_merge(case, a, lora, base_state) -> None:
    """merge(): dense W' = g (W + s B A) rounded once to W's dtype; NF4: a new NF4 weight of W' and merge_error;
    safe_merge refuses exactly when W' in the weight's dtype is not finite. unmerge(): dense W back within the
    tolerance where the merge kept it (g finite and not 0, W' finite); NF4: the original packed weight exactly."""
    base = lora.base_layer
    q0 = base.qweight if a["nf4"] else None
    s, dt = _scaling(a), a["weight"].dtype
    if not a["nf4"] and not dt.is_floating_point:  # (outside the contract: W' has no place in such a weight)
        before = _module_state(lora)
        try:
            lora.merge(safe_merge=a["safe_merge"])
        except ERRORS as e:
            check_error(e, ["safe_merge", *a])
            _assert_state(lora, before, "after a refused merge")
            return
        raise AssertionError(f"merged into a {dt} weight")
    W, A, B = _dora_weight64(a, lora, base_state, q0), d64(a["A"]), d64(a["B"])
    g, g_bound, V = _dora_g(W, A, B, s, lora.lora_magnitude_vector.detach().double())
    merged64 = g[:, None] * V
    merged = merged64.to(dt)
    bound = g_bound[:, None] * (W.abs() + abs(s) * (B.abs() @ A.abs()))  # (close's magnitude for W')
    unsafe = a["safe_merge"] and not torch.isfinite(merged).all()
    if not _merged(case, a, lora, unsafe):
        return
    assert lora.merged, "merge() did not mark the layer merged"
    if a["nf4"]:
        q = base.qweight
        assert q.packed.data_ptr() != q0.packed.data_ptr(), "merge() kept the NF4 weight"
        assert (q.shape, q.dtype, q.blocksize, q.double_quant, q.quant_storage) == \
            (q0.shape, q0.dtype, q0.blocksize, q0.double_quant, q0.quant_storage), "merge() changed the NF4 format"
        err = lora.merge_error
        assert isinstance(err, MergeError), f"merge_error is {err!r}"
        if torch.isfinite(merged).all():  # W' requantized: merge_error says how far from W' (and stays in bounds)
            got = (_dora_weight64(a, lora, base_state, q) - merged64).abs().max().item()
            slack = TOL[torch.float32] * (merged64.abs().max().item() + bound.max().item())
            assert abs(err.max_abs - got) <= slack, f"merge_error.max_abs {err.max_abs:.6g}, the oracle's {got:.6g}"
            rounding = (merged.double() - merged64).abs().max().item()  # (W' in the weight's dtype, quantized)
            assert got <= 0.2 * merged64.abs().max().item() + rounding + slack, f"NF4 W' off by {got:.3g}"
        lora.unmerge()
        exact((base.qweight.packed, base.qweight.absmax, base.qweight.nested_absmax, base.qweight.offset),
              (q0.packed, q0.absmax, q0.nested_absmax, q0.offset), a)
        assert lora.merge_error is None and not lora.merged
        return
    # Where W_i + s B_i A holds an Inf its norm is Inf, g_i 0 and W'_i has NaN (0 Inf); the layer's fp32 norm
    # (Inf - Inf) may be NaN instead, which makes all of W'_i NaN: those rows need only be non-finite.
    inf_norm = ~torch.isfinite(V.norm(dim=1))
    w = base.weight.detach()
    assert not torch.isfinite(w[inf_norm]).all(1).any(), "a row of W + s B A with an Inf merged to finite values"
    close(w[~inf_norm], merged[~inf_norm], a, lambda: bound[~inf_norm])
    lora.unmerge()
    assert not lora.merged
    # Rows the merge lost cannot come back (W' / g - s B A): g 0, Inf or NaN, or W' not finite in the weight's dtype.
    kept = torch.isfinite(g) & (g != 0) & torch.isfinite(merged).all(1)
    tiny = torch.finfo(dt).tiny / g.abs()  # (W' below the normal range: its absolute rounding, divided by g)
    close(base.weight.detach()[kept], base_state["weight"][kept], a,
          lambda: (W.abs() + abs(s) * (B.abs() @ A.abs()) + tiny[:, None])[kept])


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    cases: Any  # strategy of Case
    run: Callable[[Case], None]
    ci_examples: int
    examples: tuple = ()  # regressions: explicit cases, run first every time


def _public(name: str, builder, call, oracle, compare=exact, ci_examples: int = 160) -> Target:
    return Target(as_cases(name, builder), lambda case: check(case, call, oracle, compare, twin=False), ci_examples)


# CI examples: about a minute for the whole file on 2 cores (the slower references get fewer).
_SLOW_OPS = {"double_quant": 130, "lora_dropout": 130, "lora_backward": 130}
TARGETS: dict[str, Target] = {op.name: Target(as_cases(op.name, op.builder), run_op, _SLOW_OPS.get(op.name, 160))
                              for op in OPERATORS}
TARGETS.update(
    big=Target(_big_cases(), run_big, 240),
    quantize_dequantize_public=_public("quantize_dequantize_public", _quantize_public_args, _quantize_public,
                                       _quantize_public_ref),
    nf4_linear_public=_public("nf4_linear_public", _nf4_linear_public_args, _nf4_linear_public,
                              _nf4_linear_public_ref, close),
    lora_linear_public=_public("lora_linear_public", _lora_linear_public_args, _lora_linear_public,
                               _lora_linear_public_ref, close, ci_examples=130),
    nf4_layer_public=_public("nf4_layer_public", _nf4_layer_args, _nf4_layer, _nf4_layer_ref,
                             _compare_fields_exact_y_close),
    merge_nf4_public=_public("merge_nf4_public", _merge_nf4_public_args, _merge_nf4_public, _merge_nf4_public_ref,
                             ci_examples=100),
    lora_layer=Target(as_cases("lora_layer", _lora_layer_args), run_lora_layer, 240),  # (half with DoRA)
    multi_lora_linear_public=_public("multi_lora_linear_public", _multi_lora_linear_public_args,
                                     _multi_lora_linear_public, _multi_lora_linear_public_ref, close),
)


# ---------------------------------------------------------------- regressions: what the fuzz found, kept


def _plain_nf4(n: int, blocksize: int = 64, device: str = "cpu") -> dict:
    """An NF4 state without double quantization, for n elements."""
    return dict(packed=T(((n + 1) // 2, 1), "uint8", device=device, fill="bytes"), blocksize=blocksize,
                absmax=T((-(-n // blocksize),), device=device, fill="abs"), nested_absmax=None, nested_code=None,
                offset=None, nested_blocksize=256)


_CODE = T((256,), fill="dynmap")
_LORA = dict(A=T((2, 3)), B=T((4, 2)), scale=1.0, dropout_p=0.0, seed=0)
_MULTI = dict(weight=T((1, 1)), base="weight", bias=None, blocksize=64, double_quant=False, scaling=1.0,
              indices="list", mode="no_grad")
_DORA = dict(bias=None, nf4=False, blocksize=64, r=1, lora_alpha=1, lora_dropout=0.0, use_rslora=False, init=True,
             A=T((1, 2)), B=T((2, 1)), training=False, rng=0, safe_merge=False, use_dora=True, magnitude=None,
             m_scale=1.0)
REGRESSIONS = {
    "double_quant": (
        # reference: nan_to_num clamped an Inf absmax to 3.4e38 (bitsandbytes and the kernels keep Inf)
        Case.of("double_quant", True, absmax=T((2,), special="inf", fill="abs"), code=_CODE, blocksize=64),
        # reference: torch's mean of a strided absmax rounds by memory order; the kernels take it contiguous
        Case.of("double_quant", True, absmax=T((33,), layout="t", fill="abs"), code=_CODE, blocksize=64),
        # fake kernel: blocksize 0 divided by zero
        Case.of("double_quant", False, absmax=T((1,), fill="abs"), code=_CODE, blocksize=0),
    ),
    "merge_lora_": (
        # a meta A among CPU tensors went to the fake kernel: merge_lora_ returned, W silently unmerged
        Case.of("merge_lora_", False, A=T((2, 5), device="meta"), B=T((3, 2)), scale=1.0, W=T((3, 5)), sign=1,
                via="public"),
    ),
    "merge_nf4": (
        # fake kernel: blocksize 0 divided by zero
        Case.of("merge_nf4", False, A=T((1, 1)), B=T((1, 1)), scale=1.0, **dict(_plain_nf4(1), blocksize=0),
                shape=(1, 1)),
    ),
    "dequantize_nf4": (
        # fake kernel: a negative size reached new_empty ("Trying to create tensor with negative dimension")
        Case.of("dequantize_nf4", False, **_plain_nf4(0), shape=(-1, 0), dtype="float32"),
        # reference: indexed a 0-dim nested_absmax (the kernels take any shape with the right element count)
        Case.of("dequantize_nf4", False, packed=T((1, 1), "uint8", fill="bytes"), blocksize=64,
                absmax=T((1,), "uint8", fill="bytes"), nested_absmax=T((), fill="abs"), nested_code=_CODE,
                offset=T((), fill="abs"), nested_blocksize=256, shape=(), dtype="float32"),
    ),
    "nf4_linear": (
        # fake kernel: refused the float64 input the kernels take
        Case.of("nf4_linear", True, **_plain_nf4(6), x=T((1, 3), "float64"), out_features=2, bias=None,
                gemv_max_m=-1),
        # CPU fused kernel (few rows): read a strided float32 bias as an array
        Case.of("nf4_linear", True, **_plain_nf4(2), x=T((1,)), out_features=2, bias=T((2,), layout="s"),
                gemv_max_m=-1),
        # fake kernel: a negative out_features reached new_empty ("Trying to create tensor with negative dimension")
        Case.of("nf4_linear", False, **_plain_nf4(0), x=T((1,)), out_features=-1, bias=None, gemv_max_m=-1),
    ),
    "nf4_linear_grad_input": (
        Case.of("nf4_linear_grad_input", False, **_plain_nf4(0), x=T((1,)), in_features=-1),
    ),
    "lora_forward": (
        # reference: reshape(-1, 0) for inputs without features; fake kernel: T of 0 rows instead of 3
        Case.of("lora_forward", True, x=T((3, 0)), **dict(_LORA, A=T((2, 0))), base_out=T((3, 4))),
        # fake kernel: a 0-dim input or base output raised a bare IndexError (tuple index out of range)
        Case.of("lora_forward", False, x=T(()), **_LORA, base_out=T((4,))),
        Case.of("lora_forward", False, x=T((3,)), **_LORA, base_out=T(())),
    ),
    "lora_nf4_linear": (
        # fake kernel: the NF4 state's nested part was not passed on to the device check (a meta one was taken)
        Case.of("lora_nf4_linear", False, x=T((1,)), A=T((1, 1)), B=T((1, 1)), scale=1.0, dropout_p=0.0, seed=0,
                **dict(_plain_nf4(1), absmax=T((1,), "uint8", fill="bytes"), nested_absmax=T((1,), device="meta"),
                       nested_code=_CODE, offset=T(())), out_features=1, bias=None),
    ),
    "nf4_linear_public": (
        # autograd: the bias gradient of a layer without outputs reshaped to (-1, 0)
        Case.of("nf4_linear_public", True, weight=T((0, 1)), blocksize=64, double_quant=False, x=T((1,)),
                bias=T((0,)), grad=True),
        # CPU fused kernel: a strided bias, read as an array, added the skipped Inf
        Case.of("nf4_linear_public", True, weight=T((2, 1)), blocksize=64, double_quant=False, x=T((1,)),
                bias=T((2,), layout="t", special="inf"), grad=False),
    ),
    "lora_linear": (
        # CPU: BLAS skipped the product at scale 0, or one that rounds to 0 in fp32, dropping x's Inf (CUDA: NaN)
        Case.of("lora_linear", True, x=T((1,), special="inf"), A=T((1, 1)), B=T((1, 1)), scale=0.0, dropout_p=0.0,
                seed=0, weight=T((1, 1)), bias=None),
        Case.of("lora_linear", True, x=T((1,), special="inf"), A=T((1, 1)), B=T((1, 1)), scale=7e-200,
                dropout_p=0.0, seed=0, weight=T((1, 1)), bias=None),
        # CPU: a NaN scale reached y or not depending on the shape (BLAS's alpha); CUDA: NaN
        Case.of("lora_linear", True, x=T((7, 1)), A=T((2, 1)), B=T((33, 2)), scale=NAN, dropout_p=0.0, seed=0,
                weight=T((33, 1)), bias=None),
        # a bias of another shape reached at::linear: "output with shape [1] doesn't match the broadcast shape";
        # an int32 one was taken for 3-D inputs (matmul + add) and refused for 2-D ones (addmm)
        Case.of("lora_linear", False, x=T((1,)), A=T((1, 1)), B=T((1, 1)), scale=1.0, dropout_p=0.0, seed=0,
                weight=T((1, 1)), bias=T((2, 1), layout="x")),
        Case.of("lora_linear", False, x=T((2, 1, 1)), A=T((1, 1)), B=T((1, 1)), scale=1.0, dropout_p=0.0, seed=0,
                weight=T((1, 1)), bias=T((1,), "int32")),
        # a bool input reached at::linear: '"addmm_impl_cpu_" not implemented for 'Bool''
        Case.of("lora_linear", False, x=T((1,), "bool"), A=T((1, 1)), B=T((1, 1)), scale=1.0, dropout_p=0.0,
                seed=0, weight=T((1, 1), "bool"), bias=None),
    ),
    "multi_lora_forward_": (
        # plan() of a batch without rows: torch.as_tensor([]) is float32, refused as not integers (multi_lora.py)
        Case.of("multi_lora_forward_", True, y=T((0, 2)), x=T((0, 1)), A0=T((1, 1)), B0=T((2, 1)), scales=(1.0,),
                runs=((0, 1),), rows="plan", tiles="plan"),
    ),
    "multi_lora_linear_public": (
        # the same through adapter_indices=[]
        Case.of("multi_lora_linear_public", True, **_MULTI, x=T((0, 1)), A0=T((1, 1)), B0=T((1, 1)), runs=((0, 1),)),
        # a meta weight beside a CPU input: torch's linear returned uninitialized CPU memory as the base output
        Case.of("multi_lora_linear_public", False, **dict(_MULTI, weight=T((1, 1), device="meta")), x=T((1,)),
                runs=((-1, 1),)),
        # an int32 bias: at::linear took it for this 3-D input (matmul + add); it refuses it for 2-D ones (addmm)
        Case.of("multi_lora_linear_public", False, **dict(_MULTI, bias=T((1,), "int32")), x=T((2, 1, 1), layout="x"),
                A0=T((1, 1)), B0=T((1, 1)), runs=((0, 1),)),
    ),
    "lora_layer": (
        # DoRA forward (lora.py): g = m / ||W + s B A|| cast to fp16 became Inf past 65504, so y = g z gave NaN where
        # z is 0 (here x is) and Inf where g z is representable; with dropout in training too (xd all dropped)
        Case.of("lora_layer", True, **dict(_DORA, weight=T((2, 2), "float16"), x=T((2,), "float16", special="zero"),
                                            magnitude=T((2,), fill="abs"), m_scale=1e30)),
        Case.of("lora_layer", True, **dict(_DORA, weight=T((2, 2), "float16"), x=T((2,), "float16"), lora_dropout=0.999,
                                            training=True, magnitude=T((2,), fill="abs"), m_scale=1e30)),
        # DoRA forward with dropout (lora.py): summed as g (xd W^T + s xd A^T B^T) - xd W^T, an Inf in x gave NaN
        # where PEFT's x W^T + (g - 1) xd W^T + g s xd A^T B^T is Inf
        Case.of("lora_layer", True, **dict(_DORA, weight=T((3, 1), seed=1), A=T((1, 1)), B=T((3, 1), seed=1),
                                            x=T((1,), special="inf"), lora_dropout=0.1, training=True,
                                            magnitude=T((3,), fill="abs"))),
        # DoRA merge over NF4 (lora.py): safe_merge checked W' in fp32, but what is quantized is W' in the weight's
        # dtype, Inf in fp16 here: a non-finite 4-bit weight got through
        Case.of("lora_layer", True, **dict(_DORA, weight=T((2, 32), "float16"), nf4=True, A=T((1, 32)),
                                            x=T((32,), "float16"), safe_merge=True, magnitude=T((2,), fill="abs"),
                                            m_scale=1e30)),
        # DoRA merge (lora.py): an int32 base weight took W' truncated to integers (the LoRA merge refuses it)
        Case.of("lora_layer", False, **dict(_DORA, weight=T((1, 1), "int32"), A=T((1, 1)), B=T((1, 1)), x=T((1,)))),
        # DoRA merge (dora.merged_rows): W += s B A in place on weight.double(), which is W itself in fp64, so a
        # merge refused by safe_merge changed the base
        Case.of("lora_layer", False, **dict(_DORA, weight=T((1, 1), "float64"), A=T((1, 1)), B=T((1, 1), special="nan"),
                                             x=T((1,)), safe_merge=True)),
        # reference: where W + s B A holds an Inf (here from A) the layer's fp32 row norm may be NaN (Inf - Inf), not
        # Inf: W'_i is non-finite either way (0 Inf), and the forward's y_i NaN
        Case.of("lora_layer", True, **dict(_DORA, weight=T((1, 2)), A=T((1, 2), special="inf"), B=T((1, 1)),
                                            x=T((2,)))),
    ),
}
for _name, _cases in REGRESSIONS.items():
    TARGETS[_name] = replace(TARGETS[_name], examples=_cases)

# Defects the fuzz found in lora.py (fixed there): tests/test_fuzz.py checks they stay fixed.
KNOWN_DEFECTS = {
    "lora.lora_linear with a trainable weight: a bias of another shape gets torch's broadcast message": Case.of(
        "lora_linear_public", False, x=T((1,)), A=T((1, 1)), B=T((2, 1)), weight=T((2, 1)), bias=T((2, 2)),
        scaling=1.0, dropout=0.0, training=False, rng=0, nf4=False, blocksize=64, double_quant=False, grad=False,
        weight_grad=True),
    "LoraLinear.merge(safe_merge=True) over an expanded weight: torch's overlap message from copy_": Case.of(
        "lora_layer", False, weight=T((2, 1), layout="x"), bias=None, nf4=False, blocksize=64, r=1, lora_alpha=0,
        lora_dropout=0.0, use_rslora=False, init=True, A=T((1, 1)), B=T((2, 1)), x=T((1,)), training=False, rng=0,
        safe_merge=True),
}


def _segfault(case: Case) -> None:
    """Only for tests/test_fuzz.py, which checks that a crash is reported with its case, not lost."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    ctypes.string_at(0)


TARGETS["selfcheck_crash"] = Target(st.just(Case.of("selfcheck_crash")), _segfault, 1)
TARGET_NAMES = [n for n in TARGETS if not n.startswith("selfcheck")]


# ---------------------------------------------------------------- runner


def _settings(**kw) -> settings:
    return settings(deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck), **kw)


def _hypothesis_test(target: Target, body: Callable) -> Callable:
    test = given(case=target.cases)(body)
    for ex in target.examples:
        test = example(case=ex)(test)
    return test


def run_target(name: str, seconds: float, scale: float) -> dict:
    """Run one target: with seconds, randomized batches until the time is spent; else derandomized, its CI
    number of examples times scale. -> {"status", "examples", "seconds", "detail"}"""
    target = TARGETS[name]
    count = [0]

    def body(case):
        count[0] += 1
        print(f"CASE {case!r}", flush=True)
        target.run(case)

    start = time.monotonic()
    try:
        if seconds:
            while time.monotonic() - start < seconds:  # a fresh test each batch: settings apply once per test
                _settings(derandomize=False, max_examples=200)(_hypothesis_test(target, body))()
        else:
            n = max(1, round(target.ci_examples * scale))
            _settings(derandomize=True, max_examples=n)(_hypothesis_test(target, body))()
        status, detail = "ok", ""
    except Exception as e:  # noqa: BLE001 (hypothesis re-raises the shrunk failure; report it)
        status, detail = "fail", "".join(traceback.format_exception(e))[-8000:]
    return dict(status=status, examples=count[0], seconds=round(time.monotonic() - start, 2), detail=detail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help=f"default: all of {TARGET_NAMES}")
    p.add_argument("--results", required=True, help="JSON file, rewritten after each target")
    p.add_argument("--seconds", type=float, default=0.0, help="total time of a randomized run (0: the CI run)")
    p.add_argument("--scale", type=float, default=1.0, help="times each target's CI number of examples")
    args = p.parse_args(argv)
    names = args.targets or TARGET_NAMES
    results = {}
    for name in names:
        results[name] = run_target(name, args.seconds / len(names), args.scale)
        print(f"DONE {name} {results[name]['status']} {results[name]['examples']} cases", flush=True)
        with open(args.results, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
