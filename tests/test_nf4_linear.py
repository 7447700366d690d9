"""NF4Linear: forward against an fp64 reference, state dicts interchangeable with bitsandbytes' Linear4bit."""
import json

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import reference as R

from conftest import requires_c
from nf4_definition import dequantize_by_definition

try:
    import bitsandbytes as bnb
except ImportError:  # only the tests that compare with it need it
    bnb = None
requires_bnb = pytest.mark.skipif(bnb is None, reason="needs bitsandbytes (its Linear4bit checkpoints)")

pytestmark = requires_c

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _bnb_linear4bit(linear: nn.Linear, double_quant: bool, blocksize: int = 64, quant_storage=torch.uint8):
    l4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=linear.weight.dtype, compress_statistics=double_quant, quant_type="nf4",
                           quant_storage=quant_storage)
    l4.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                  compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage)
    if linear.bias is not None:
        l4.bias = nn.Parameter(linear.bias.detach().clone())
    return l4.to("cpu")  # quantizes


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@requires_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_dict_identical_to_bitsandbytes(dtype, double_quant):
    linear = nn.Linear(130, 77).to(dtype)
    ours = lora_ext.NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant).state_dict()
    theirs = _bnb_linear4bit(linear, double_quant).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k].to(ours[k].device)), k


@requires_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_loads_bitsandbytes_checkpoint(double_quant):
    linear = nn.Linear(96, 200).to(torch.float16)
    l4 = _bnb_linear4bit(linear, double_quant, blocksize=128)
    ours = lora_ext.NF4Linear(96, 200, bias=True, blocksize=64, double_quant=not double_quant)
    ours.load_state_dict(l4.state_dict())
    assert ours.blocksize == 128 and (ours.nested_absmax is not None) == double_quant
    expected = dequantize_by_definition(l4.weight.data, l4.weight.quant_state)
    assert torch.equal(ours.dequantize(), expected)
    x = torch.randn(5, 96, dtype=torch.float16)
    # Ours accumulates in fp32 on the fp32 dequantized weight; bitsandbytes' Linear4bit rounds W to fp16
    # and multiplies in fp16 (its forward is not used as the oracle: its CPU dequant depends on the CPU).
    ref = torch.nn.functional.linear(x.double(), expected.double(), l4.bias.double())
    torch.testing.assert_close(ours(x).double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    as_bnb = torch.nn.functional.linear(x.float(), expected.float(), l4.bias.float()).half()
    torch.testing.assert_close(ours(x), as_bnb, rtol=4e-3, atol=4e-3 * ref.abs().max().item())


@requires_bnb
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_loads_ours(double_quant, quant_storage):
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    ours = lora_ext.NF4Linear.from_linear(linear, double_quant=double_quant, quant_storage=quant_storage)
    sd = ours.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    assert param.quant_storage == quant_storage
    # What bitsandbytes read from our state dict decodes, by the format's definition, to our weight.
    state = param.quant_state
    assert state.blocksize == ours.blocksize and tuple(state.shape) == (48, 64) and state.dtype == torch.bfloat16
    assert torch.equal(dequantize_by_definition(param.data, state), ours.dequantize())


def test_safetensors_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    linear = nn.Linear(256, 33).to(torch.bfloat16)
    ours = lora_ext.NF4Linear.from_linear(linear, blocksize=32, double_quant=True)
    path = tmp_path / "layer.safetensors"
    safetensors.save_file(ours.state_dict(), str(path))
    fresh = lora_ext.NF4Linear(256, 33, dtype=torch.bfloat16)
    fresh.load_state_dict(safetensors.load_file(str(path)))
    assert torch.equal(fresh.dequantize(), ours.dequantize())
    assert torch.equal(fresh.bias, ours.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_against_fp64_reference(dtype, bias):
    linear = nn.Linear(4097 // 8, 23, bias=bias).to(dtype)  # 512 in: not a multiple of the 4096 blocksize
    layer = lora_ext.NF4Linear.from_linear(linear, blocksize=4096 if dtype == torch.float32 else 64)
    x = torch.randn(2, 3, 512, dtype=dtype, requires_grad=True)
    y = layer(x)
    qw = layer.qweight
    w64 = R.dequantize_nf4(qw.packed, qw.absmax, qw.blocksize, qw.shape, torch.float64, qw.nested_absmax,
                           qw.nested_code, qw.offset, compute_dtype=torch.float64)
    ref = x.double() @ w64.t() + (layer.bias.double() if bias else 0)
    assert y.shape == (2, 3, 23) and y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is None and not layer.weight.requires_grad


def test_non_contiguous_input():
    layer = lora_ext.NF4Linear.from_linear(nn.Linear(64, 16))
    x = torch.randn(64, 10).t()  # (10, 64), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


# ---------------------------------------------------------------- bad checkpoints change nothing


def _assert_unchanged(module, before):
    after = module.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k


def _with_meta(sd, **changes):
    """sd with its packed JSON quant state changed."""
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = {**json.loads(bytes(sd[key].tolist()).decode()), **changes}
    return {**sd, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def _good_state_dict(in_features=64, out_features=48, double_quant=True):
    return lora_ext.NF4Linear.from_linear(nn.Linear(in_features, out_features), double_quant=double_quant).state_dict()


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: _good_state_dict(64, 32), r"quant state shape must be \(48, 64\), got \(32, 64\)"),
    (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"][:-1]}, r"absmax must have 48 entries"),
    (lambda sd: {**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)},
     "not a valid packed JSON quant state"),
    (lambda sd: {**sd, "weight": sd["weight"][:-3]}, "packed weight must hold 1536 bytes"),
    (lambda sd: {**sd, "weight.quant_map": torch.linspace(-1, 1, 16)}, "quant_map must be the 16-entry NF4"),
    (lambda sd: {k: v for k, v in sd.items() if k != "weight.quant_state.bitsandbytes__nf4"},
     "expected the packed quant state key"),
    (lambda sd: {**sd, "weight.nested_absmax": torch.ones(3)}, "nested_absmax must be float32 with 1 entries"),
    (lambda sd: {**sd, "bias": torch.zeros(7)}, r"bias must have shape \(48,\)"),
    (lambda sd: {**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)},
     "must hold a JSON object, got list"),
    (lambda sd: _with_meta(sd, nested_blocksize=0), "nested_blocksize must be a positive integer, got 0"),
    (lambda sd: _with_meta(sd, nested_blocksize="256"), "nested_blocksize must be a positive integer, got '256'"),
])
def test_bad_checkpoint_is_refused_and_changes_nothing(corrupt, message):
    layer = lora_ext.NF4Linear.from_linear(nn.Linear(64, 48))
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(corrupt(_good_state_dict()))
    _assert_unchanged(layer, before)


@requires_bnb
def test_fp4_checkpoint_is_refused():
    l4 = bnb.nn.Linear4bit(64, 48, quant_type="fp4")
    l4.weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False, quant_type="fp4")
    l4 = l4.to("cpu")
    layer = lora_ext.NF4Linear(64, 48)
    with pytest.raises(RuntimeError, match="only nf4 is supported"):
        layer.load_state_dict(l4.state_dict())


def test_unexpected_keys_are_reported_as_nn_linear_reports_them():
    """A bias for a layer without one, and a quant-state key bitsandbytes does not write, are unexpected (a
    bias-less layer would silently drop the checkpoint's bias); a loaded bias keeps the module's dtype."""
    src = lora_ext.NF4Linear.from_linear(nn.Linear(64, 48))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias"'):
        lora_ext.NF4Linear.from_linear(nn.Linear(64, 48, bias=False)).load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight.quant_state.bitsandbytes__fp4"'):
        lora_ext.NF4Linear(64, 48).load_state_dict({**src.state_dict(),
                                                    "weight.quant_state.bitsandbytes__fp4": torch.zeros(2)})
    half = lora_ext.NF4Linear.from_linear(nn.Linear(64, 48)).half()
    half.load_state_dict(src.state_dict())
    assert half.bias.dtype == torch.float16 and torch.equal(half.bias, src.bias.half())


def test_assign_keeps_the_checkpoints_tensors_for_a_meta_module():
    """load_state_dict(assign=True) into a module built on the meta device, the usual way to build a large
    model without allocating it: the checkpoint's tensors, not meta ones; the output is the source layer's."""
    src = lora_ext.NF4Linear.from_linear(nn.Linear(64, 48))
    dst = lora_ext.NF4Linear(64, 48).to("meta")  # (as accelerate's init_empty_weights leaves it)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.weight.device.type == dst.absmax.device.type == dst.bias.device.type == "cpu"
    x = torch.randn(3, 64)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_to_linear_dequantizes_to_the_dtype_the_module_was_cast_to(cast):
    """After model.half() the dense layer merge_and_unload(dequantize=True) and base_state_dict build is fp16,
    as the rest of the model: it runs beside it, with the dequantized weight by the format's definition."""
    layer = getattr(lora_ext.NF4Linear.from_linear(nn.Linear(64, 48)), cast)()
    dense = layer.to_linear()
    dtype = getattr(torch, "float16" if cast == "half" else cast)
    assert dense.weight.dtype == dense.bias.dtype == dtype and layer.dtype == torch.float32
    assert torch.equal(dense.weight, layer.dequantize(dtype))
    x = torch.randn(3, 64, dtype=dtype)
    torch.testing.assert_close(dense(x), layer(x), rtol=2e-2, atol=2e-2)
    assert layer.float().to_linear().weight.dtype == torch.float32


def test_missing_weight_is_reported():
    layer = lora_ext.NF4Linear(64, 48)
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict({"bias": torch.zeros(48)})


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="expects an nn.Linear or a Hugging Face Conv1D, got Conv1d"):
        lora_ext.NF4Linear.from_linear(nn.Conv1d(3, 3, 1))


def test_to_moves_quant_state(device):
    layer = lora_ext.NF4Linear.from_linear(nn.Linear(64, 8)).to(device)
    assert layer.weight.device.type == device and layer.absmax.device.type == device
    assert layer.nested_absmax.device.type == device and layer.offset.device.type == device
    x = torch.randn(2, 64, device=device)
    assert layer(x).device.type == device
