"""merge_lora_ / unmerge_lora_ (dense, in place) and NF4 merges, LoraLinear.merge/unmerge."""

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import reference as R
from lora_ext.merge import merge_nf4, merge_nf4_reference

from conftest import requires_c, requires_cuda

pytestmark = requires_c
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _adapters(d, k, r, device="cpu"):
    return torch.randn(r, k, device=device) / k**0.5, torch.randn(d, r, device=device) / r**0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_is_the_fp64_result_rounded_once(device, dtype):
    for d, k, r in [(37, 53, 1), (64, 100, 12), (5, 4097, 16), (300, 7, 64)]:
        W = torch.randn(d, k, device=device).to(dtype)
        A, B = _adapters(d, k, r, device)
        ours, ref = W.clone(), W.clone()
        lora_ext.merge_lora_(ours, A, B, 0.75)
        R.merge_lora_(ref, A, B, 0.75)
        assert torch.equal(ours, ref), (d, k, r)
        # ... and that is what the exact update rounds to.
        exact = (W.double() + 0.75 * (B.double() @ A.double())).float().to(dtype)
        assert (ours != exact).float().mean() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_large_odd_shape(dtype):
    W = torch.randn(4097, 11008).to(dtype)
    A, B = _adapters(4097, 11008, 12)
    ours, ref = W.clone(), W.clone()
    lora_ext.merge_lora_(ours, A, B, 2.0)
    R.merge_lora_(ref, A, B, 2.0)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_then_unmerge_within_one_ulp(device, dtype):
    W = torch.randn(129, 257, device=device).to(dtype)
    A, B = _adapters(129, 257, 12, device)
    W2 = W.clone()
    lora_ext.merge_lora_(W2, A, B, 1.5)
    assert not torch.equal(W2, W)
    merged = W2.float().abs()
    lora_ext.unmerge_lora_(W2, A, B, 1.5)
    # One ulp at the larger of the original and merged magnitudes (the merged value was rounded there).
    ulp = torch.finfo(dtype).eps * torch.maximum(W.float().abs(), merged).clamp(min=torch.finfo(dtype).tiny)
    assert ((W2.float() - W.float()).abs() <= ulp).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_merge_bit_exact_and_reports_its_error(device, double_quant):
    qw = lora_ext.quantize_nf4((torch.randn(96, 4097) * 0.05).to(device), 64, double_quant)
    A, B = _adapters(96, 4097, 12, device)
    new, err = merge_nf4(qw, A, B, 0.5)
    packed, absmax, nested, offset = merge_nf4_reference(qw, A, B, 0.5)
    assert torch.equal(new.data, packed) and torch.equal(new.absmax, absmax)
    if double_quant:
        assert torch.equal(new.nested_absmax, nested) and torch.equal(new.offset, offset)
    exact = (B.double() @ A.double()) * 0.5
    change = new.dequantize(torch.float32).double() - qw.dequantize(torch.float32).double()
    assert err.max_abs == pytest.approx((change - exact).abs().max().item())
    assert err.rel_frobenius == pytest.approx(((change - exact).norm() / exact.norm()).item())
    assert new.shape == qw.shape and new.dtype == qw.dtype


def test_nf4_merge_odd_shapes_and_storage():
    for (d, k), bs in [((3, 5), 32), ((37, 129), 64), ((9, 4096 + 7), 4096)]:
        qw = lora_ext.quantize_nf4(torch.randn(d, k) * 0.1, bs, True, quant_storage=torch.uint8)
        A, B = _adapters(d, k, 5)
        new, _ = merge_nf4(qw, A, B, 1.0)
        packed, absmax, nested, offset = merge_nf4_reference(qw, A, B, 1.0)
        assert torch.equal(new.data, packed) and torch.equal(new.absmax, absmax), (d, k, bs)
    qw = lora_ext.quantize_nf4(torch.randn(64, 64).bfloat16(), 64, True, quant_storage=torch.bfloat16)
    new, _ = merge_nf4(qw, *_adapters(64, 64, 4), 0.5)
    assert new.quant_storage == torch.bfloat16 and new.dtype == torch.bfloat16


def test_lora_linear_merged_forward_equals_unmerged(device):
    for dtype in DTYPES:
        layer = lora_ext.LoraLinear(nn.Linear(200, 120).to(device=device, dtype=dtype), r=12, lora_alpha=24,
                                    init_lora_weights=False)
        x = torch.randn(9, 200, device=device, dtype=dtype)
        y = layer(x).detach()
        W0 = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert layer.merged
        y_m = layer(x).detach()
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(y_m.float(), y.float(), rtol=tol, atol=tol * y.abs().max().item())
        merged = layer.base_layer.weight.detach().float().abs()
        layer.unmerge()
        assert not layer.merged
        ulp = torch.finfo(dtype).eps * torch.maximum(W0.float().abs(), merged)
        assert ((layer.base_layer.weight.float() - W0.float()).abs() <= ulp + torch.finfo(dtype).tiny).all()


def test_nf4_lora_merge_and_exact_unmerge():
    layer = lora_ext.LoraLinear(lora_ext.NF4Linear.from_linear(nn.Linear(128, 64)), r=8, lora_alpha=16,
                                init_lora_weights=False)
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    x = torch.randn(5, 128)
    y = layer(x).detach()
    layer.merge()
    assert layer.merge_error is not None and 0 < layer.merge_error.rel_frobenius < 1
    y_m = layer(x).detach()
    assert (y_m - y).abs().max() < 0.5 * y.abs().max()  # the 4-bit rounding of the merged weight
    layer.unmerge()
    after = layer.base_layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "unmerge restores the packed weight exactly"
    torch.testing.assert_close(layer(x), y)


def test_nf4_unmerge_restores_the_weight_where_the_layer_is_now():
    """A layer moved while merged (.to(device)): unmerge puts the original 4-bit weight back on the layer's
    device, not where it was merged (the meta device stands in for another one)."""
    layer = lora_ext.LoraLinear(lora_ext.NF4Linear.from_linear(nn.Linear(64, 32)), r=2, init_lora_weights=False)
    layer.merge()
    layer.to("meta")
    layer.unmerge()
    base = layer.base_layer
    assert {t.device.type for t in (base.weight, base.absmax, base.nested_absmax, layer.lora_A)} == {"meta"}


def test_nf4_safe_merge_checks_the_weight_in_its_own_dtype():
    """A merged fp16 weight past fp16's range is Inf in the layer that holds it, though finite in fp32: refused
    over NF4 as over a dense fp16 weight, and the base is left as it was."""
    for base in (nn.Linear(64, 32, dtype=torch.float16).requires_grad_(False),
                 lora_ext.NF4Linear.from_linear(nn.Linear(64, 32, dtype=torch.float16))):
        layer = lora_ext.LoraLinear(base, r=2)
        with torch.no_grad():
            layer.lora_A.fill_(300.0)
            layer.lora_B.fill_(300.0)  # s B A = 2 * 2 * 300 * 300 = 360000 > 65504
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(ValueError, match="NaN or Inf; the base weight was left unchanged"):
            layer.merge(safe_merge=True)
        assert not layer.merged and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_merge_twice_warns_and_does_nothing():
    layer = lora_ext.LoraLinear(nn.Linear(32, 16), r=4, lora_alpha=8, init_lora_weights=False)
    layer.merge()
    W = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, W)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_safe_merge_refuses_non_finite_and_leaves_w():
    layer = lora_ext.LoraLinear(nn.Linear(32, 16), r=4, lora_alpha=8, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A[0, 3] = float("inf")
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf; the base weight was left unchanged"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W) and not layer.merged


def test_tied_weights_are_refused():
    shared = nn.Linear(32, 32)
    other = nn.Linear(32, 32)
    other.weight = shared.weight
    a = lora_ext.LoraLinear(shared, r=4, lora_alpha=8, init_lora_weights=False)
    b = lora_ext.LoraLinear(other, r=4, lora_alpha=8, init_lora_weights=False)  # noqa: F841 (held, like a model)
    W = shared.weight.detach().clone()
    with pytest.raises(RuntimeError, match="shared with another LoRA layer .tied weights."):
        a.merge()
    assert torch.equal(shared.weight, W)


def test_bad_input_leaves_w_untouched():
    W = torch.randn(8, 16)
    W0 = W.clone()
    A, B = _adapters(8, 16, 2)
    cases = [
        ((W, A[:, :15], B), r"A must be \(r, 16\) and B \(8, r\)"),
        ((W, A, B[:7]), r"A must be \(r, 16\) and B \(8, r\)"),
        ((torch.randn(16, 8).t(), A, B), "must be contiguous"),
        ((torch.ones(8, 16, dtype=torch.int32), A, B), "must be float32, float16 or bfloat16, got Int"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            lora_ext.merge_lora_(*args, 1.0)
        assert torch.equal(W, W0)


@requires_cuda
def test_adapters_on_another_device_are_refused():
    W = torch.randn(8, 16, device="cuda")
    W0 = W.clone()
    A, B = _adapters(8, 16, 2)
    with pytest.raises(RuntimeError, match="A must be on cuda:0, got cpu"):
        lora_ext.merge_lora_(W, A, B.cuda(), 1.0)
    assert torch.equal(W, W0)


def test_opcheck(device):
    W = torch.randn(16, 24, device=device, dtype=torch.bfloat16)
    A, B = _adapters(16, 24, 3, device)
    torch.library.opcheck(torch.ops.lora_ext.merge_lora_.default, (W, A, B, 0.5))
    torch.library.opcheck(torch.ops.lora_ext.unmerge_lora_.default, (W, A, B, 0.5))
    qw = lora_ext.quantize_nf4(W, 64, True)
    torch.library.opcheck(torch.ops.lora_ext.merge_nf4.default,
                          (qw.packed, qw.absmax, 64, [16, 24], A, B, 0.5, qw.nested_absmax, qw.nested_code, qw.offset))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_matches_cpu_bit_for_bit(dtype):
    W = torch.randn(4097, 1030).to(dtype)
    A, B = _adapters(4097, 1030, 12)
    cpu, gpu = W.clone(), W.cuda()
    lora_ext.merge_lora_(cpu, A, B, 1.25)
    lora_ext.merge_lora_(gpu, A.cuda(), B.cuda(), 1.25)
    assert torch.equal(gpu.cpu(), cpu)


@requires_cuda
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_nf4_merge_matches_cpu(double_quant):
    qw = lora_ext.quantize_nf4(torch.randn(130, 515) * 0.05, 64, double_quant)
    A, B = _adapters(130, 515, 12)
    cpu, _ = merge_nf4(qw, A, B, 0.5)
    gpu, _ = merge_nf4(qw.to("cuda"), A.cuda(), B.cuda(), 0.5)
    assert torch.equal(gpu.data.cpu(), cpu.data)
    if not double_quant:
        assert torch.equal(gpu.absmax.cpu(), cpu.absmax)
