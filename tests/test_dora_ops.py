"""DoRA's operators (csrc/dora): dora_forward / dora_backward and the layer ops dora_linear /
dora_nf4_linear, against lora_ext.reference's DoRA in fp64 (written from the formula, not from the
kernels' g * B rearrangement), one rounding, gradcheck, opcheck, bad input; and LoraLinear(use_dora=True)
as one autograd node over them."""
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lora_ext
from lora_ext import dora_ops
from lora_ext import reference as R

from conftest import backward_nodes, on_each_simd_path, requires_c, requires_cuda, ulp

pytestmark = requires_c

OPS = torch.ops.lora_ext


def _inputs(lead, K, N, r, device, dtype, adapter_dtype=torch.float32):
    x = torch.randn(*lead, K, device=device).to(dtype)
    W = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    A = (torch.randn(r, K, device=device) / math.sqrt(K)).to(adapter_dtype)
    B = (torch.randn(N, r, device=device) / math.sqrt(r)).to(adapter_dtype)
    g = (torch.rand(N, device=device) + 0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)
    bias = torch.randn(N, device=device).to(dtype)
    return x, W, A, B, g, bias


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * (b.abs().max().item() + 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead, with_bias", [((37,), True), ((3, 11), False), ((1,), True)])
def test_ops_against_fp64(device, dtype, lead, with_bias):
    """Forward and backward of dora_forward / dora_backward against the fp64 reference, odd shapes; g
    has zeros (a magnitude of 0: the gradients stay finite and equal the reference's)."""
    K, N, r, s = 29, 23, 5, 0.7
    x, W, A, B, g, bias = _inputs(lead, K, N, r, device, dtype)
    g[::4] = 0.0
    bias = bias if with_bias else None
    base_out = x @ W.t()
    y, T = OPS.dora_forward(x, base_out, A, B, g, bias, s)
    d64 = [t.double() if t is not None else None for t in (x, base_out, A, B, g, bias)]
    y_ref, T_ref = R.dora_forward(*d64, s)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert y.dtype == dtype and y.shape == (*lead, N) and T.dtype == A.dtype
    _close(y, y_ref, tol)
    _close(T, T_ref, 1e-5)
    dy = torch.randn(*lead, N, device=device).to(dtype)
    dx_base = torch.randn(*lead, K, device=device).to(dtype)
    grads = OPS.dora_backward(dy, x, base_out, T, A, B, g, s, dx_base)
    refs = R.dora_backward(dy.double(), d64[0], d64[1], T_ref, d64[2], d64[3], d64[4], s, dx_base.double())
    for name, ours, ref in zip(("dx", "dA", "dB", "dg"), grads, refs):
        assert torch.isfinite(ours).all(), name
        assert ours.shape == ref.shape, name
        _close(ours, ref, tol if name == "dx" else 1e-5)
    assert (grads[2][::4] == 0).all() and (grads[3][::4] != 0).all(), "g = 0: no dB, but a gradient for m"


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_output_rounded_once(device, act):
    """y = g (base + s T B^T) + bias is computed in fp32 and rounded once: against the fp64 value rounded
    once, within an ulp everywhere and equal nearly everywhere (rounding g's product and the bias
    separately would miss in a large share of the elements)."""
    K, N, r, s = 203, 77, 12, 1.7
    x, W, A, B, g, bias = _inputs((129,), K, N, r, device, act)
    g = g * 3.1  # g * z far from z, so a rounding before the scale would show
    base_out = torch.randn(129, N, device=device).to(act)
    y, _ = OPS.dora_forward(x, base_out, A, B, g, bias, s)
    ref = R.dora_forward(x.double(), base_out.double(), A.double(), B.double(), g.double(), bias.double(), s)[0]
    once = ref.to(act)
    fp32_sums = 1e-6 * ref.abs().max().item()
    assert ((y.double() - ref).abs() <= ulp(once) + fp32_sums).all()
    assert (y != once).double().mean().item() < 0.01


def test_gradcheck_fp64_cpu():
    x, W, A, B, g, bias = _inputs((4, 3), 7, 6, 3, "cpu", torch.float64, torch.float64)
    g[1] = 0.0
    base_out = x @ W.t()
    leaves = [t.clone().requires_grad_() for t in (x, base_out, A, B, g, bias)]
    assert torch.autograd.gradcheck(lambda *t: dora_ops.dora_forward(*t, 1.3), leaves)
    qw = lora_ext.quantize_nf4(W.float(), blocksize=32)
    for weight in (W, qw):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, g)]
        fn = lambda x, A, B, g, weight=weight: dora_ops.dora_layer(x, weight, bias, A, B, g, 1.3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck(device):
    x, W, A, B, g, bias = _inputs((6,), 40, 24, 4, device, torch.float32)
    base_out = x @ W.t()
    x.requires_grad_()
    A.requires_grad_()
    g.requires_grad_()
    OPS_args = {
        OPS.dora_forward.default: (x, base_out, A, B, g, bias, 0.5),
        OPS.dora_linear.default: (x, W, bias, A, B, g, 0.5),
    }
    qw = lora_ext.quantize_nf4(W, blocksize=64)
    OPS_args[OPS.dora_nf4_linear.default] = (x, qw.packed, qw.absmax, 24, 64, bias, qw.nested_absmax, qw.nested_code,
                                             qw.offset, qw.nested_blocksize, A, B, g, 0.5)
    for op, args in OPS_args.items():
        torch.library.opcheck(op, args)
    y, T = OPS.dora_forward(x.detach(), base_out, A.detach(), B, g.detach(), bias, 0.5)
    torch.library.opcheck(OPS.dora_backward.default, (torch.randn_like(y), x.detach(), base_out, T, A.detach(), B,
                                                      g.detach(), 0.5, torch.randn_like(x)))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_layer_ops_against_fp64(device, kind):
    """dora_linear / dora_nf4_linear (3-D x, bias) against the fp64 layer over the same (dequantized)
    weight: outputs and the gradients of x, A, B and g (through the base's dx as well)."""
    x, W, A, B, g, bias = _inputs((2, 9), 48, 40, 6, device, torch.float32)
    weight = lora_ext.quantize_nf4(W, blocksize=64) if kind == "nf4" else W
    W64 = (lora_ext.dequantize_nf4(weight, torch.float32) if kind == "nf4" else W).double()
    leaves = [t.clone().requires_grad_() for t in (x, A, B, g)]
    leaves64 = [t.double().requires_grad_() for t in (x, A, B, g)]
    y = dora_ops.dora_layer(leaves[0], weight, bias, *leaves[1:], 0.9)
    y_ref = R.dora_forward(leaves64[0], leaves64[0] @ W64.t(), *leaves64[1:], bias.double(), 0.9)[0]
    dy = torch.randn_like(y)
    _close(y, y_ref, 1e-5)
    for ours, ref in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves64, dy.double())):
        _close(ours, ref, 1e-5)


def test_bad_input_is_refused(device):
    x, W, A, B, g, bias = _inputs((4,), 32, 16, 4, device, torch.float32)
    base_out = x @ W.t()
    with pytest.raises(RuntimeError, match=r"dora_forward: g \(magnitude / weight norm\) must be a floating-point "
                                           r"vector of the 16 output features, got Float of shape \[15\]"):
        OPS.dora_forward(x, base_out, A, B, g[:15], None, 1.0)
    with pytest.raises(RuntimeError, match="dora_forward: bias must be a floating-point vector of the 16 output"):
        OPS.dora_forward(x, base_out, A, B, g, torch.ones(16, dtype=torch.int32, device=device), 1.0)
    with pytest.raises(RuntimeError, match=r"dora_forward: base output must have the input's leading dims and 16"):
        OPS.dora_forward(x, base_out[:, :15], A, B, g, None, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_forward: lora_B must be \(out_features, 4\)"):
        OPS.dora_forward(x, base_out, A, B[:, :3], g, None, 1.0)
    T = torch.randn(4, 4, device=device)
    with pytest.raises(RuntimeError, match="dora_backward: grad_x_base must have the input's 128 elements"):
        OPS.dora_backward(torch.randn(4, 16, device=device), x, base_out, T, A, B, g, 1.0,
                          torch.randn(4, 31, device=device))
    with pytest.raises(RuntimeError, match=r"dora_backward: T must be \(4, 4\)"):
        OPS.dora_backward(torch.randn(4, 16, device=device), x, base_out, T[:3], A, B, g, 1.0, None)
    args = (torch.randn(4, 16, device=device), x, base_out, T.double(), A, B, g, 1.0, None)
    with pytest.raises(RuntimeError, match=r"dora_backward: T must be in lora_A's dtype \(the forward's T\), got "
                                           r"Double for Float"):
        OPS.dora_backward(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="dora_backward: T must be in lora_A's dtype"):
        OPS.dora_backward(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))
    with pytest.raises(RuntimeError, match="dora_linear: the base weight and bias are frozen here"):
        dora_ops.dora_layer(x, W.clone().requires_grad_(), None, A.clone().requires_grad_(), B, g, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_linear: weight must be \(out_features, 32\), got \[16, 31\]"):
        dora_ops.dora_layer(x, W[:, :31], None, A, B, g, 1.0)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="g .* must be on cuda"):
            OPS.dora_forward(x, base_out, A, B, g.cpu(), None, 1.0)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_dora_layer_is_one_operator(device, kind):
    """LoraLinear(use_dora=True) without dropout: its backward is the layer op's node plus g = m / norm's
    division (nothing elementwise over the activations), and it equals the base-then-dora_forward path
    (a hooked base) bit for bit in the forward."""
    dense = nn.Linear(40, 24).to(device).requires_grad_(False)
    base = lora_ext.NF4Linear.from_linear(dense) if kind == "nf4" else dense
    layer = lora_ext.LoraLinear(base, r=4, lora_alpha=8, use_dora=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 40, device=device)
    nodes = backward_nodes(layer, x)
    op = "lora_ext::dora::DoraNf4LinearFunction" if kind == "nf4" else "lora_ext::dora::DoraLinearFunction"  # C++ node
    assert sum(op in n for n in nodes) == 1 and not any("Mul" in n or "Add" in n for n in nodes), nodes
    y = layer(x)
    layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    assert not lora_ext.lora.runs_as_one_op(layer.base_layer)
    assert any("dora_forward" in n for n in backward_nodes(layer, x))
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)


def test_backward_with_create_graph():
    """A backward with create_graph=True (a gradient penalty elsewhere in the model) runs through the DoRA
    layer and gives the plain backward's gradients."""
    layer = lora_ext.LoraLinear(nn.Linear(12, 7).requires_grad_(False), r=3, lora_alpha=6, use_dora=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 12, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    plain = torch.autograd.grad(layer(x).square().sum(), params)
    graph = torch.autograd.grad(layer(x).square().sum(), params, create_graph=True)
    for a, b in zip(graph, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_layer_ops_equal_their_references():
    """dora_linear / dora_nf4_linear against lora_ext.reference's, all three outputs, fp64 inputs: the same
    math to fp64's rounding over the dense base; over NF4, the reference takes the base product in fp32."""
    x, W, A, B, g, bias = _inputs((3, 5), 64, 16, 4, "cpu", torch.float64, torch.float64)
    qw = lora_ext.quantize_nf4(W.float(), blocksize=64)
    nf4 = (qw.packed, qw.absmax, 16, 64, bias, qw.nested_absmax, qw.nested_code, qw.offset, qw.nested_blocksize)
    dense = (x, W, bias, A, B, g, 0.6)
    for ours, ref, tol in [(OPS.dora_linear(*dense), R.dora_linear(*dense), 1e-12),
                           (OPS.dora_nf4_linear(x, *nf4, A, B, g, 0.6), R.dora_nf4_linear(x, *nf4, A, B, g, 0.6),
                            1e-5)]:
        for a, b in zip(ours, ref):
            _close(a, b, tol)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("r, N, K", [(16, 37, 203), (1, 8, 1), (5, 3, 64), (7, 300, 17)])
def test_a_times_w_t_against_fp64(device, wdtype, r, N, K):
    """dora_a_times_w_t (the norm's A W^T) reads W in its dtype: against fp64, N not a multiple of the
    8 rows converted at once, K odd; W as nn.Linear stores it and transposed (Conv1D's view)."""
    A = torch.randn(r, K, device=device)
    W = torch.randn(N, K, device=device).to(wdtype)
    for weight in (W, W.t().contiguous().t()):
        out = dora_ops.a_times_w_t(A, weight)
        ref = R.dora_a_times_w_t(A, weight)
        assert out.dtype == ref.dtype and out.shape == (r, N)
        _close(out, ref, 1e-12 if wdtype == torch.float64 else 2e-6)


def test_a_times_w_t_simd_and_portable_paths_agree():
    """Both paths, against fp64, in fresh processes: AVX2/FMA and the portable loops (LORA_EXT_DISABLE_SIMD=1);
    K and N ragged."""
    script = ("import torch, lora_ext\n"
              "from lora_ext import dora_ops, reference as R\n"
              "torch.manual_seed(0)\n"
              "A = torch.randn(7, 203); W = torch.randn(37, 203).bfloat16()\n"
              "out, ref = dora_ops.a_times_w_t(A, W), R.dora_a_times_w_t(A, W)\n"
              "print(((out.double() - ref.double()).abs().max() / ref.abs().max()).item())\n")
    for flag, error in on_each_simd_path(script):
        assert error < 1e-6, (flag, error)


def test_a_times_w_t_opcheck_and_bad_input(device):
    A, W = torch.randn(4, 40, device=device), torch.randn(24, 40, device=device).bfloat16()
    torch.library.opcheck(OPS.dora_a_times_w_t.default, (A, W))
    with pytest.raises(RuntimeError, match=r"dora_a_times_w_t: lora_A must be \(r, in_features\) and the weight "
                                           r"\(out_features, in_features\), got \[4, 40\] and \[24, 39\]"):
        OPS.dora_a_times_w_t(A, W[:, :39])
    with pytest.raises(RuntimeError, match="dora_a_times_w_t: lora_A and the weight must be floating point"):
        OPS.dora_a_times_w_t(A, torch.ones(24, 40, dtype=torch.int8, device=device))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("r, N, K", [(16, 37, 203), (1, 8, 1), (7, 300, 17), (64, 50, 96)])
def test_weight_norm_ops_against_fp64(device, wdtype, r, N, K):
    """dora_weight_norm (from the dense weight, as nn.Linear stores it and transposed as Conv1D's view) and
    dora_weight_norm_from_a_w_t (a_w_t contiguous and as a transposed view, which it must not overwrite) against
    ||W + s B A|| of the full matrix in fp64."""
    A, B = torch.randn(r, K, device=device), torch.randn(N, r, device=device)
    W = torch.randn(N, K, device=device).to(wdtype)
    w_sq = W.double().square().sum(1).float()
    exact = R.dora_weight_norm(A, B, W, w_sq, 0.7)
    for weight in (W, W.t().contiguous().t()):
        out = dora_ops.weight_norm(A, B, weight, w_sq, 0.7)
        assert out.dtype == torch.float32 and out.shape == (N,)
        _close(out, exact, 1e-5)
    a_w_t = A.double() @ W.double().t()
    for awt in (a_w_t.float(), a_w_t.float().t().contiguous().t()):
        before = awt.clone()
        out = dora_ops.weight_norm_from_a_w_t(A, B, awt, w_sq, 0.7)
        _close(out, exact, 1e-5)
        _close(out, R.dora_weight_norm_from_a_w_t(A, B, awt, w_sq, 0.7), 1e-5)
        assert torch.equal(awt, before)


def test_weight_norm_is_zero_not_nan_where_w_plus_sba_vanishes(device):
    """A row with W_i = -s B_i A: the squared norm's rounding can fall below zero; the norm is 0, not NaN."""
    A, B = torch.randn(3, 20, device=device), torch.randn(6, 3, device=device)
    W = -0.5 * B @ A
    W[1:] = torch.randn(5, 20, device=device)
    w_sq = W.square().sum(1)
    out = dora_ops.weight_norm(A, B, W, w_sq, 0.5)
    assert torch.isfinite(out).all() and out[0] < 1e-2
    _close(out[1:], R.dora_weight_norm(A, B, W, w_sq, 0.5)[1:], 1e-5)
    A[0, 0] = float("nan")  # and a NaN in A makes every norm NaN, as the fp64 formula does (not 0 by a clamp)
    assert dora_ops.weight_norm(A, B, W, w_sq, 0.5).isnan().all()
    assert R.dora_weight_norm(A, B, W, w_sq, 0.5).isnan().all()


def test_weight_norm_opcheck_and_bad_input(device):
    A, B = torch.randn(4, 40, device=device), torch.randn(24, 4, device=device)
    W, w_sq = torch.randn(24, 40, device=device).bfloat16(), torch.rand(24, device=device)
    torch.library.opcheck(OPS.dora_weight_norm.default, (A, B, W, w_sq, 0.5))
    torch.library.opcheck(OPS.dora_weight_norm_from_a_w_t.default, (A, B, torch.randn(4, 24, device=device), w_sq, 0.5))
    with pytest.raises(RuntimeError, match=r"dora_weight_norm: the weight must be \(24, 40\), got \[24, 39\]"):
        OPS.dora_weight_norm(A, B, W[:, :39], w_sq, 0.5)
    with pytest.raises(RuntimeError, match=r"dora_weight_norm: lora_A must be \(r, in_features\) and lora_B "
                                           r"\(out_features, r\), got \[4, 40\] and \[24, 3\]"):
        OPS.dora_weight_norm(A, B[:, :3], W, w_sq, 0.5)
    with pytest.raises(RuntimeError, match=r"dora_weight_norm_from_a_w_t: a_w_t \(A W\^T\) must be \(4, 24\), got "
                                           r"\[24, 4\]"):
        OPS.dora_weight_norm_from_a_w_t(A, B, torch.randn(24, 4, device=device), w_sq, 0.5)
    with pytest.raises(RuntimeError, match="dora_weight_norm: w_sq .* must be a vector of the 24 output features"):
        OPS.dora_weight_norm(A, B, W, w_sq[:23], 0.5)
    with pytest.raises(RuntimeError, match="dora_weight_norm: every argument must be floating point"):
        OPS.dora_weight_norm(A, B, W.to(torch.int8), w_sq, 0.5)


@requires_cuda
def test_weight_norm_products_stay_fp32_where_tf32_is_allowed():
    """On CUDA the norm's products are ATen's (cuBLAS). With TF32 allowed (set_float32_matmul_precision("high"),
    as HF Trainer's tf32=True does) they must stay fp32, as the CPU's and our kernels' are. Every entry of A
    and W is +-(1 + 2^-12), which TF32 (10 mantissa bits) reads as +-1: each product then loses 2^-11, a
    systematic error that no sign pattern averages away, where fp32 is exact to 1e-7. cuBLAS's own matmul
    shows that loss first, so the test shows something."""
    gen = torch.Generator().manual_seed(23)

    def signs(*shape):
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float() * (1 + 2 ** -12)

    A, W = signs(16, 4096).cuda(), signs(256, 4096).cuda()
    B = torch.randn(256, 16, generator=gen).cuda()
    w_sq = W.double().square().sum(1).float()
    exact = A.double() @ W.double().t()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tf32_loss = ((A @ W.t()).double() - exact).abs().max() / exact.abs().max()
        a_w_t = OPS.dora_a_times_w_t(A, W)
        norm = OPS.dora_weight_norm(A, B, W, w_sq, 0.5)
        norm_from = OPS.dora_weight_norm_from_a_w_t(A, B, a_w_t, w_sq, 0.5)
    finally:
        torch.set_float32_matmul_precision(before)
    assert tf32_loss > 1e-4, f"cuBLAS took no TF32 here (max relative error {tf32_loss:.2e}): nothing to show"
    _close(a_w_t, exact, 1e-5)
    ref = R.dora_weight_norm(A, B, W, w_sq, 0.5)
    _close(norm, ref, 1e-5)
    _close(norm_from, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_grad_is_the_fp32_product_rounded_once(device, dtype):
    """dora_scaled_grad: g * dy with the fp32 product rounded once to dy's dtype, bit for bit; rows not a multiple
    of the 8 values taken at once, 3-D and non-contiguous dy, NaN and Inf passed through. fp64 g goes through fp64."""
    g = torch.rand(37, device=device) * 3
    for dy in (torch.randn(3, 5, 37, device=device).to(dtype), torch.randn(37, 11, device=device).to(dtype).t(),
               torch.randn(1, 37, device=device).to(dtype)):
        dy[..., 0, 3], dy[..., 0, 4] = float("nan"), float("inf")
        out = OPS.dora_scaled_grad(dy, g)
        assert out.dtype == dtype and out.shape == dy.shape
        torch.testing.assert_close(out, R.dora_scaled_grad(dy, g), rtol=0, atol=0, equal_nan=True)
    dy = torch.randn(4, 37, device=device).to(dtype)
    assert torch.equal(OPS.dora_scaled_grad(dy, g.double()), R.dora_scaled_grad(dy, g.double()))


def test_scaled_grad_simd_and_portable_paths_agree():
    """The AVX2 and the portable loop of the CPU kernel (fresh processes): both equal the fp32 product rounded
    once, bf16 and fp16, a row of 203 values."""
    script = ("import torch, lora_ext\n"
              "torch.manual_seed(0)\n"
              "g = torch.rand(203) * 3\n"
              "bad = 0\n"
              "for dt in (torch.bfloat16, torch.float16):\n"
              "    dy = (torch.randn(9, 203) * 100).to(dt)\n"
              "    bad += int((torch.ops.lora_ext.dora_scaled_grad(dy, g) != (dy.float() * g).to(dt)).sum())\n"
              "print(bad)\n")
    for flag, mismatches in on_each_simd_path(script):
        assert mismatches == 0, (flag, mismatches)


def test_scaled_grad_opcheck_and_bad_input(device):
    dy, g = torch.randn(5, 24, device=device).bfloat16(), torch.rand(24, device=device)
    torch.library.opcheck(OPS.dora_scaled_grad.default, (dy, g))
    with pytest.raises(RuntimeError, match=r"dora_scaled_grad: g \(magnitude / weight norm\) must be a floating-point "
                                           r"vector of the 24 output features, got Float of shape \[23\]"):
        OPS.dora_scaled_grad(dy, g[:23])
    with pytest.raises(RuntimeError, match="dora_scaled_grad: grad_output must be floating point"):
        OPS.dora_scaled_grad(dy.to(torch.int32), g)


@pytest.mark.parametrize("use_dora", [False, True])
def test_layer_backward_makes_no_zero_gradients_for_its_other_outputs(use_dora):
    """The layer ops' C++ nodes leave the gradients of T (and DoRA's base_out, M x N) undefined instead of
    allocating and filling zeros at every backward."""
    layer = lora_ext.LoraLinear(nn.Linear(40, 24).requires_grad_(False), r=4, lora_alpha=8, use_dora=use_dora)
    x = torch.randn(5, 40, requires_grad=True)
    y = layer(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y.backward(torch.randn_like(y))
    filled = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::zeros", "aten::fill_", "aten::zero_") and e.input_shapes
              and e.input_shapes[0] in ([5, 24], [5, 4])]
    assert not filled, filled
