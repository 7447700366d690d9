"""LoRA initialisations that read the base weight (lora_ext/inits.py), with PEFT 0.21.2 as the oracle: PiSSA
(full and randomised SVD), OLoRA, LoftQ over our NF4 quantizer, and the conversion of a trained PiSSA/OLoRA
adapter back to plain LoRA (PEFT's path_initial_model_for_weight_conversion)."""
import copy
import inspect
import json
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import inits
from lora_ext.lora import LoraLinear

from conftest import requires_c

pytestmark = requires_c
peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

IN, OUT, R, ALPHA = 70, 45, 8, 16
LOFTQ_4 = {"loftq_bits": 4, "loftq_iter": 4}


def _close(a, b, tol=1e-5):
    """Equal within tol relative to b's largest entry (fp32 results of different but equivalent sums)."""
    scale = b.detach().abs().max().item() + 1e-30
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=tol, atol=tol * scale)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _delta(layer: LoraLinear) -> torch.Tensor:
    """s·B·A in fp32, (s·B)·A as PEFT (and inits) compute it."""
    return (layer.scaling * layer.lora_B.detach().float()) @ layer.lora_A.detach().float()


def _same_factors(A, B, A_ref, B_ref, tol=1e-5):
    """A, B equal to A_ref, B_ref up to the sign of each rank-one term (SVD and QR sign conventions)."""
    sign = torch.sign((A * A_ref).sum(1))
    _close(A * sign[:, None], A_ref, tol)
    _close(B * sign, B_ref, tol)


class _Holder(nn.Module):
    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


def _peft(base: nn.Module, **cfg):
    """PEFT's LoRA layer over a copy of `base` (module 'proj' of a tiny model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set for Conv1D
        model = peft.get_peft_model(_Holder(proj=copy.deepcopy(base)),
                                    peft.LoraConfig(target_modules=["proj"], **cfg))
    return model.base_model.model.proj


def _linear(dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(IN, OUT).to(dtype)
    nn.init.normal_(lin.bias)  # not the near-zero default: the bias must survive every init
    return lin.requires_grad_(False)


def _conv1d_like(lin: nn.Linear) -> nn.Module:
    """The Hugging Face Conv1D computing what `lin` computes (weight stored (in, out))."""
    conv = Conv1D(lin.out_features, lin.in_features)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    return conv


def _output_unchanged(layer, original, in_features, tol=1e-5):
    """The layer at init computes what the dense module it was built from computes (3-D input)."""
    x = torch.randn(3, 5, in_features, dtype=original.weight.dtype)
    with torch.no_grad():
        _close(layer(x), original(x), tol)


# ---------------------------------------------------------------- PiSSA and OLoRA against PEFT, dense bases


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dense_matches_peft(init, use_rslora):
    lin = _linear()
    peft_layer = _peft(lin, r=R, lora_alpha=ALPHA, use_rslora=use_rslora, init_lora_weights=init)
    ours = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, use_rslora=use_rslora, init_lora_weights=init)
    A_p, B_p = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])
    _close(ours.base_layer.weight, peft_layer.base_layer.weight)
    _close(_delta(ours), peft_layer.scaling["default"] * B_p @ A_p)
    _same_factors(ours.lora_A, ours.lora_B, A_p, B_p)
    assert ours.lora_A.dtype == ours.lora_B.dtype == torch.float32 and ours.lora_A.requires_grad
    assert not any(p.requires_grad for p in ours.base_layer.parameters())
    _output_unchanged(ours, lin, IN)


def _decaying_spectrum(out, inn, decay=0.8) -> torch.Tensor:
    """A weight whose singular values fall off like a trained layer's (a random one's hardly do, and then no
    randomised SVD finds the top r)."""
    U, _ = torch.linalg.qr(torch.randn(out, min(out, inn)))
    V, _ = torch.linalg.qr(torch.randn(inn, min(out, inn)))
    return (U * decay ** torch.arange(min(out, inn), dtype=torch.float32)) @ V.t()


def test_pissa_niter_matches_peft_and_full_svd(monkeypatch):
    lin = _linear()
    with torch.no_grad():
        lin.weight.copy_(_decaying_spectrum(OUT, IN))
    # Same draws on both sides: PEFT creates its A and B with kaiming_uniform_ (from the generator) first.
    svd_lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(7)
        return svd_lowrank(*args, **kwargs)
    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(sys.modules["peft.tuners.lora.layer"], "svd_lowrank", seeded)
    peft_layer = _peft(lin, r=R, lora_alpha=ALPHA, init_lora_weights="pissa_niter_4")
    ours = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, init_lora_weights="pissa_niter_4")
    _close(ours.base_layer.weight, peft_layer.base_layer.weight)
    _close(ours.lora_A, peft_layer.lora_A["default"].weight)
    _close(ours.lora_B, peft_layer.lora_B["default"].weight)
    _output_unchanged(ours, lin, IN)
    full = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, init_lora_weights="pissa")
    assert _rel(_delta(ours), _delta(full)) < 0.05


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conv1d_base(init):
    """GPT-2's Conv1D: computed on the (out, in) weight, stored back as (in, out). PiSSA equals PEFT's on the
    Conv1D itself (fan_in_fan_out); PEFT's OLoRA does not transpose a Conv1D weight (its factors come out with
    the wrong shapes), so ours is checked against PEFT's on the equivalent nn.Linear."""
    lin = _linear()
    conv = _conv1d_like(lin)
    ours = LoraLinear(copy.deepcopy(conv), r=R, lora_alpha=ALPHA, init_lora_weights=init)
    peft_layer = _peft(conv if init == "pissa" else lin, r=R, lora_alpha=ALPHA, init_lora_weights=init)
    assert type(ours.base_layer) is Conv1D and ours.base_layer.weight.shape == (IN, OUT)
    _close(ours.base_layer.weight, peft_layer.base_layer.weight if init == "pissa" else
           peft_layer.base_layer.weight.t())
    _same_factors(ours.lora_A, ours.lora_B, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
    _output_unchanged(ours, conv, IN)


def test_bf16_base_and_bf16_adapter():
    """The base keeps its dtype and the adapter its own; the residual is taken against the adapter as stored
    (rounded to bf16), so the output at init stays the base's to bf16 rounding of the residual."""
    lin = _linear(dtype=torch.bfloat16)
    ours = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, init_lora_weights="pissa",
                      adapter_dtype=torch.bfloat16)
    assert ours.base_layer.weight.dtype == ours.lora_A.dtype == ours.lora_B.dtype == torch.bfloat16
    expected = lin.weight.float() - _delta(ours)
    _close(ours.base_layer.weight.float(), expected.to(torch.bfloat16).float(), 0)
    _output_unchanged(ours, lin, IN, tol=2e-2)
    fp32_adapter = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, init_lora_weights="olora")
    assert fp32_adapter.lora_A.dtype == torch.float32 and fp32_adapter.base_layer.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- NF4 bases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize,double_quant,storage", [(64, True, torch.uint8), (128, False, torch.bfloat16)])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nf4_base(init, blocksize, double_quant, storage, dtype):
    """Dequantize to fp32, decompose, store NF4(W - s·B·A) with the base's own blocksize/double quant/storage;
    the layer's dtype is kept. A and B are what the same init gives on the dequantized dense weight."""
    lin = nn.Linear(72, OUT).to(dtype)  # 72 x 45 packs into an even number of bytes: a bf16 storage fits
    nf4 = lora_ext.NF4Linear.from_linear(lin, blocksize, double_quant, storage)
    w0 = nf4.dequantize(torch.float32)
    ours = LoraLinear(copy.deepcopy(nf4), r=R, lora_alpha=ALPHA, init_lora_weights=init)
    dense = nn.Linear(72, OUT, bias=False)
    with torch.no_grad():
        dense.weight.copy_(w0)
    ref = LoraLinear(dense, r=R, lora_alpha=ALPHA, init_lora_weights=init)
    _close(ours.lora_A, ref.lora_A)
    _close(ours.lora_B, ref.lora_B)
    base = ours.base_layer
    qw = base.qweight
    assert isinstance(base, lora_ext.NF4Linear) and base.dtype == dtype and qw.dtype == dtype
    assert (qw.blocksize, qw.double_quant, qw.quant_storage) == (blocksize, double_quant, storage)
    assert not any(p.requires_grad for p in base.parameters())
    expected = lora_ext.quantize_nf4(ref.base_layer.weight.detach(), blocksize, double_quant)
    assert torch.equal(qw.packed, expected.packed)
    # At init the layer is the NF4 base it wrapped, up to the 4-bit rounding of the residual: about what
    # quantizing the dense weight cost in the first place (the residual is no larger than W).
    w = lin.weight.detach().float()
    first = _rel(lora_ext.dequantize_nf4(lora_ext.quantize_nf4(w, blocksize, double_quant)), w)
    assert _rel(base.dequantize(torch.float32) + _delta(ours), w0) < 1.1 * first


def test_olora_on_nf4_matches_peft_on_bitsandbytes():
    """PEFT's OLoRA over a bitsandbytes Linear4bit (the case it re-quantizes) and ours over the same bytes: the
    same A, B and the same re-quantized residual, byte for byte. fp32 and rows of 128 (a multiple of the
    blocksize): bitsandbytes' CPU dequant is exact there (DESIGN.md)."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(128, OUT)
    l4 = bnb.nn.Linear4bit(128, OUT, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                           quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
    l4.bias = nn.Parameter(dense.bias.detach().clone())
    l4 = l4.to("cpu")
    nf4 = lora_ext.NF4Linear(128, OUT)
    nf4.load_state_dict(l4.state_dict())
    ours = LoraLinear(nf4, r=R, lora_alpha=ALPHA, init_lora_weights="olora")
    peft_layer = _peft(l4, r=R, lora_alpha=ALPHA, init_lora_weights="olora")
    theirs = lora_ext.NF4Linear(128, OUT)
    theirs.load_state_dict(peft_layer.base_layer.state_dict())
    assert torch.equal(ours.base_layer.qweight.packed, theirs.qweight.packed)
    _close(ours.base_layer.dequantize(torch.float32), theirs.dequantize(torch.float32), 0)
    _same_factors(ours.lora_A, ours.lora_B, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)


# ---------------------------------------------------------------- LoftQ


def _peft_loftq_on_cpu(weight, num_bits, reduced_rank, num_iter):
    """PEFT's own loftq_init, run on the CPU over our NF4 quantizer. PEFT 0.21 needs bitsandbytes on "cuda"/"xpu"
    (its compute device is hard-coded): the function's source is run with that one line set to "cpu" and
    bitsandbytes' two calls mapped to quantize_nf4(blocksize 64, double quant) / dequantize_nf4."""
    lu = sys.modules["peft.utils.loftq_utils"]
    src = inspect.getsource(lu.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert src.count(line) == 1, "PEFT's loftq_init changed: revisit this test"
    scope = dict(vars(lu), is_bnb_available=lambda: True, is_bnb_4bit_available=lambda: True)
    exec(compile(src.replace(line, 'compute_device = "cpu"'), lu.__file__, "exec"), scope)

    class Params4bit:
        def __init__(self, data, requires_grad, compress_statistics, quant_type):
            assert quant_type == "nf4"
            self.data, self.quant_state = None, lora_ext.quantize_nf4(data, 64, True)

        def to(self, device):
            return self

    shim = types.SimpleNamespace(nn=types.SimpleNamespace(Params4bit=Params4bit), functional=types.SimpleNamespace(
        dequantize_4bit=lambda data, quant_state: lora_ext.dequantize_nf4(quant_state, torch.float32)))
    saved = sys.modules.get("bitsandbytes")
    sys.modules["bitsandbytes"] = shim
    try:
        return scope["loftq_init"](weight, num_bits=num_bits, reduced_rank=reduced_rank, num_iter=num_iter)
    finally:
        if saved is None:
            del sys.modules["bitsandbytes"]
        else:
            sys.modules["bitsandbytes"] = saved


@pytest.mark.parametrize("alpha", [16, 32])
@pytest.mark.parametrize("iters", [1, 4])
def test_loftq_matches_peft_loop(iters, alpha):
    """Same quantized base as PEFT's loop, and s·B·A equal to PEFT's B·A: PEFT splits the SVD ignoring the
    scaling (its layer adds s·B·A, off by s unless alpha = r: peft#1982), we split it as PiSSA does."""
    w = nn.Linear(200, 256).weight.detach()
    deq_peft, A_p, B_p = _peft_loftq_on_cpu(w, 4, 16, iters)
    qw, A, B = inits.loftq(w, 16, alpha / 16, iters)
    assert torch.equal(qw.dequantize(torch.float32), deq_peft)
    _close((alpha / 16) * B @ A, B_p @ A_p)
    if alpha == 16:
        _close(A, A_p, 0)
        _close(B, B_p, 0)


def _fp64_loftq(w, r, scaling, iters):
    """The loop again in fp64 (our quantizer for the 4 bits), as an independent oracle of its structure."""
    w64, res = w.double(), w
    for i in range(iters):
        deq = lora_ext.dequantize_nf4(lora_ext.quantize_nf4(res, 64, True), torch.float32).double()
        U, S, Vh = torch.linalg.svd(w64 - deq, full_matrices=False)
        delta = (U[:, :r] * S[:r]) @ Vh[:r]
        res = (w64 - delta).float()
    return deq, delta


def test_loftq_reduces_quantization_error():
    """256 x 200, r = 16: ||W - (dequant(Q) + s·B·A)||_F below plain NF4's ||W - dequant(NF4(W))||_F, and 4
    iterations no worse than 1 (as for PEFT's loop, test_loftq_matches_peft_loop)."""
    lin = nn.Linear(200, 256)
    nn.init.normal_(lin.bias)
    w = lin.weight.detach().clone()
    plain = (w - lora_ext.dequantize_nf4(lora_ext.quantize_nf4(w))).norm().item()
    errors = {}
    for iters in (1, 4):
        layer = LoraLinear(copy.deepcopy(lin), r=16, lora_alpha=32, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": iters})
        base = layer.base_layer
        assert isinstance(base, lora_ext.NF4Linear) and base.qweight.blocksize == 64 and base.qweight.double_quant
        assert base.qweight.quant_storage == torch.uint8 and base.dtype == torch.float32
        assert not any(p.requires_grad for p in base.parameters()) and layer.lora_A.requires_grad
        assert torch.equal(base.bias, lin.bias) and "base_layer.weight.absmax" in layer.state_dict()
        deq = base.dequantize(torch.float32)
        errors[iters] = (w - (deq + _delta(layer))).norm().item()
        deq64, delta64 = _fp64_loftq(w, 16, layer.scaling, iters)
        # fp32 and fp64 residuals round apart, and double quant's offset (the mean of all absmax) moves every
        # dequantized value when any block changes: after the first pass the loops agree on how well they do.
        assert errors[iters] == pytest.approx((w.double() - (deq64 + delta64)).norm().item(), rel=1e-3)
        if iters == 1:
            assert torch.equal(deq.double(), deq64)
            _close(_delta(layer), delta64.float(), 1e-4)
        _output_unchanged(layer, lin, 200, tol=0.05)
    print(f"\nLoftQ 256x200 r=16: plain NF4 {plain:.4f}, LoftQ iter 1 {errors[1]:.4f} ({errors[1] / plain:.3f}x), "
          f"iter 4 {errors[4]:.4f} ({errors[4] / plain:.3f}x)")
    assert errors[1] < 0.95 * plain
    assert errors[4] <= errors[1] * 1.001


def test_loftq_conv1d_and_bf16():
    """A Conv1D base becomes an NF4Linear that knows it was a Conv1D (to_linear rebuilds one), with the same Q
    as the equivalent nn.Linear; a bf16 base quantizes its fp32 residuals and keeps bf16 as its dtype."""
    lin = _linear()
    conv = _conv1d_like(lin)
    a = LoraLinear(copy.deepcopy(conv), r=R, lora_alpha=ALPHA, init_lora_weights="loftq", loftq_config=LOFTQ_4)
    b = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, init_lora_weights="loftq", loftq_config=LOFTQ_4)
    assert torch.equal(a.base_layer.qweight.packed, b.base_layer.qweight.packed)
    _close(_delta(a), _delta(b))
    assert type(a.base_layer.to_linear()) is Conv1D
    _output_unchanged(a, conv, IN, tol=0.05)
    half = LoraLinear(copy.deepcopy(lin).to(torch.bfloat16), r=R, lora_alpha=ALPHA, init_lora_weights="loftq",
                      loftq_config=LOFTQ_4)
    assert half.base_layer.dtype == torch.bfloat16 and half.lora_A.dtype == torch.float32
    assert half.base_layer.bias.dtype == torch.bfloat16


# ---------------------------------------------------------------- back to plain LoRA


def _perturb_(layer: LoraLinear) -> None:
    """What training does to an adapter: A and B both move."""
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.add_(0.05 * p.abs().mean() * torch.randn_like(p))


def _adapter(layer: LoraLinear, path="proj") -> dict:
    return {f"{path}.lora_A.weight": layer.lora_A.detach().clone(),
            f"{path}.lora_B.weight": layer.lora_B.detach().clone()}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_to_plain_lora_over_the_original_base(init, use_rslora):
    """Original base + converted adapter (rank 2r, PEFT's alpha) computes what the trained PiSSA/OLoRA layer
    (residual base + trained adapter) computes."""
    lin = _linear()
    trained = LoraLinear(copy.deepcopy(lin), r=R, lora_alpha=ALPHA, use_rslora=use_rslora, init_lora_weights=init)
    initial = _adapter(trained)
    _perturb_(trained)
    config = {"r": R, "lora_alpha": ALPHA, "use_rslora": use_rslora, "init_lora_weights": init,
              "rank_pattern": {}, "alpha_pattern": {}}
    weights, new = inits.to_plain_lora(_adapter(trained), initial, config)
    assert (new["r"], new["init_lora_weights"]) == (2 * R, True) and config["r"] == R
    plain = LoraLinear(copy.deepcopy(lin), r=new["r"], lora_alpha=new["lora_alpha"], use_rslora=use_rslora)
    assert plain.scaling == pytest.approx(trained.scaling)
    with torch.no_grad():
        plain.lora_A.copy_(weights["proj.lora_A.weight"])
        plain.lora_B.copy_(weights["proj.lora_B.weight"])
    x = torch.randn(4, IN)
    with torch.no_grad():
        _close(plain(x), trained(x))


def _read_adapter(path) -> tuple:
    from safetensors.torch import load_file
    prefix = "base_model.model."
    tensors = {k[len(prefix):]: v for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    return tensors, json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_to_plain_lora_matches_peft(tmp_path, use_rslora):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) and to_plain_lora on the same
    tensors and config: the same tensors and the same adapter_config.json (rank_pattern / alpha_pattern too)."""
    patterns = {} if use_rslora else {"rank_pattern": {"b": 4}, "alpha_pattern": {"b": 12}}
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=use_rslora, init_lora_weights="pissa",
                          target_modules=["a", "b"], **patterns)
    model = peft.get_peft_model(_Holder(a=nn.Linear(IN, OUT), b=nn.Linear(OUT, 33)), cfg)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    initial, _ = _read_adapter(tmp_path / "init")
    trained, config = _read_adapter(tmp_path / "trained")
    expected, expected_config = _read_adapter(tmp_path / "converted")
    config["init_lora_weights"] = "pissa"  # as our adapter's config says it
    weights, new_config = inits.to_plain_lora(trained, initial, config)
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    # PEFT keeps target_modules as a set: its saved order follows the set's, which means nothing
    for c in (new_config, expected_config):
        c["target_modules"] = sorted(c["target_modules"])
    assert new_config == expected_config


def test_to_plain_lora_errors():
    A, B = torch.randn(R, IN), torch.randn(OUT, R)
    trained = {"proj.lora_A.weight": A, "proj.lora_B.weight": B, "proj.bias": torch.randn(OUT)}
    config = {"r": R, "lora_alpha": ALPHA, "use_rslora": False, "init_lora_weights": "pissa"}
    with pytest.raises(ValueError, match="the initial adapter has no 'proj.lora_B.weight'"):
        inits.to_plain_lora(trained, {"proj.lora_A.weight": A}, config)
    with pytest.raises(ValueError, match=r"proj.lora_A.weight is \(8, 70\) in the trained adapter but \(4, 70\)"):
        inits.to_plain_lora(trained, {"proj.lora_A.weight": A[:4], "proj.lora_B.weight": B}, config)
    with pytest.raises(ValueError, match="not supported for use_rslora=True with rank_pattern or alpha_pattern"):
        inits.to_plain_lora(trained, trained, dict(config, use_rslora=True, rank_pattern={"proj": 4}))
    with pytest.warns(UserWarning, match=r"left out: \['proj.bias'\]"):
        weights, _ = inits.to_plain_lora(trained, trained, config)
    assert set(weights) == {"proj.lora_A.weight", "proj.lora_B.weight"}
    with pytest.warns(UserWarning, match="only makes sense for an adapter initialised with PiSSA/OLoRA"):
        inits.to_plain_lora({}, {}, dict(config, init_lora_weights="loftq"))


# ---------------------------------------------------------------- bad values


ACCEPTED = r"init_lora_weights must be one of True, False, 'gaussian', 'pissa', 'pissa_niter_N' \(N a non-negative"


@pytest.mark.parametrize("init,loftq_config,nf4,message", [
    ("pisa", None, False, ACCEPTED + r".*got 'pisa'"),
    ("pissa_niter_x", None, False, ACCEPTED + r".*got 'pissa_niter_x'"),
    ("pissa_niter_-1", None, False, ACCEPTED),
    (1, None, False, ACCEPTED + ".*got 1"),
    ("loftq", None, False, r"init_lora_weights='loftq' needs loftq_config=\{'loftq_bits': 4, 'loftq_iter': N\}"),
    ("loftq", {"loftq_bits": 8, "loftq_iter": 1}, False, "loftq_bits must be 4 .*, got 8"),
    ("loftq", {"loftq_bits": 4, "loftq_iter": 0}, False, "loftq_iter must be an integer >= 1, got 0"),
    ("loftq", {"loftq_bit": 4}, False, r"loftq_config has unknown keys \['loftq_bit'\]"),
    ("loftq", LOFTQ_4, True, "quantizes the dense base weight itself and needs the dense nn.Linear or Conv1D, "
                             "got an NF4Linear"),
])
def test_bad_values_leave_everything_unchanged(init, loftq_config, nf4, message):
    base = lora_ext.NF4Linear.from_linear(_linear()) if nf4 else _linear().requires_grad_(True)
    before = copy.deepcopy(base.state_dict())
    grads = [p.requires_grad for p in base.parameters()]
    with pytest.raises(ValueError, match=message):
        LoraLinear(base, r=R, lora_alpha=ALPHA, init_lora_weights=init, loftq_config=loftq_config)
    with pytest.raises(ValueError, match=message):
        inits.check_init_lora_weights(init, loftq_config, base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert [p.requires_grad for p in base.parameters()] == grads
    # The same on a built layer: its adapter and base stay as they were.
    layer = LoraLinear(base, r=R, lora_alpha=ALPHA, init_lora_weights=False)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=message):
        inits.initialize_(layer, init, loftq_config)
    assert layer.base_layer is base
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_accepted_values():
    for value in (True, False, "gaussian", "pissa", "pissa_niter_0", "pissa_niter_16", "olora"):
        inits.check_init_lora_weights(value)
        assert not inits.needs_dense_base(value)
    inits.check_init_lora_weights("loftq", LOFTQ_4)
    inits.check_init_lora_weights("loftq", peft.LoftQConfig(loftq_bits=4, loftq_iter=2), _linear())
    assert inits.needs_dense_base("loftq")
    trainable = _linear().requires_grad_(True)
    with pytest.raises(ValueError, match="needs lora_alpha > 0"):
        LoraLinear(trainable, r=R, lora_alpha=0, init_lora_weights="pissa")
    assert all(p.requires_grad for p in trainable.parameters())
    layer = LoraLinear(_linear(), r=R, lora_alpha=ALPHA, init_lora_weights="olora")
    layer.reset_lora_parameters(True)  # plain inits still reset the adapter alone
    assert torch.count_nonzero(layer.lora_B) == 0
