"""LoRA operators and LoraLinear: against lora_ext.reference (fp64), against PEFT's LoRA layer (dense
and bitsandbytes 4-bit base), dropout masks, saved-for-backward bytes, compile/checkpoint/autocast."""
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lora_ext
from lora_ext import reference as R

from conftest import backward_nodes, on_each_simd_path, requires_c, requires_cuda, ulp

pytestmark = requires_c


def _lora_inputs(M_shape, K, N, r, device, dtype=torch.float32, adapter_dtype=torch.float32):
    x = torch.randn(*M_shape, K, device=device, dtype=dtype)
    base_out = torch.randn(*M_shape, N, device=device, dtype=dtype)
    A = (torch.randn(r, K, device=device) / math.sqrt(K)).to(adapter_dtype)
    B = (torch.randn(N, r, device=device) / math.sqrt(r)).to(adapter_dtype)
    return x, base_out, A, B


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*inputs)
    dy = torch.sin(torch.arange(y.numel(), device=y.device, dtype=torch.float64)).view(y.shape).to(y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad for t in inputs]


def _close(a, b, tol):
    scale = b.abs().max().item() + 1e-30
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics_and_reference(device, p):
    x = torch.randn(1000, 257, device=device)
    out = lora_ext.ops.lora_dropout(x, p, seed=2024)
    keep = out != 0
    n = x.numel()
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac
    assert torch.equal(out.cpu(), R.lora_dropout(x.cpu(), p, 2024)), "CPU/CUDA kernels and the reference must agree"
    torch.testing.assert_close(out[keep], x[keep] / (1 - p))
    assert not torch.equal(out, lora_ext.ops.lora_dropout(x, p, seed=2025)), "another seed, another mask"


def test_dropout_mask_is_the_same_in_forward_and_backward(device):
    x, base_out, A, B = _lora_inputs((64,), 48, 40, 8, device)
    p, seed = 0.3, 77
    _, (gx, _, gA, _) = _grads(lambda x, b, A, B: lora_ext.ops.lora_forward(x, b, A, B, 2.0, p, seed),
                               [x, base_out, A, B])
    keep = R.dropout_keep_mask(x.numel(), p, seed, device).view(x.shape)
    assert (gx[~keep] == 0).all() and (gx[keep] != 0).any(), "dx must be zero exactly where x was dropped"
    # dA only sees kept inputs: zeroing dropped x entries changes nothing.
    x2 = torch.where(keep, x, torch.full_like(x, 1e6))
    _, (_, _, gA2, _) = _grads(lambda x, b, A, B: lora_ext.ops.lora_forward(x, b, A, B, 2.0, p, seed),
                               [x2, base_out, A, B])
    torch.testing.assert_close(gA, gA2)


# ---------------------------------------------------------------- ops against the fp64 reference


@pytest.mark.parametrize("r", [1, 8, 12, 16, 64, 256])
def test_forward_backward_against_reference(device, r):
    K, N = 300, 260
    for M_shape, p in [((1,), 0.0), ((7,), 0.2), ((2, 3), 0.0), ((4096,), 0.1)]:
        if r == 256 and M_shape == (4096,):
            continue  # same kernels as r=64, keeps the CPU run short
        x, base_out, A, B = _lora_inputs(M_shape, K, N, r, device)
        scale, seed = 16 / r, 1234 + r

        def ours(x, b, A, B):
            return lora_ext.ops.lora_forward(x, b, A, B, scale, p, seed)

        def ref(x, b, A, B):
            return R.lora_forward(x, b, A, B, scale, p, seed)[0]

        y, g = _grads(ours, [x, base_out, A, B])
        y_ref, g_ref = _grads(ref, [t.double() for t in (x, base_out, A, B)])
        _close(y, y_ref, 1e-5)
        for a, b in zip(g, g_ref):
            _close(a, b, 1e-5)


def test_gradcheck_fp64_cpu():
    x, base_out, A, B = (t.double() for t in _lora_inputs((5,), 9, 7, 3, "cpu"))
    inputs = [t.requires_grad_(True) for t in (x, base_out, A, B)]
    for p in (0.0, 0.4):
        assert torch.autograd.gradcheck(lambda x, b, A, B: lora_ext.ops.lora_forward(x, b, A, B, 1.5, p, 99), inputs)


def test_bf16_activations_fp32_adapters(device):
    x, base_out, A, B = _lora_inputs((33,), 128, 96, 16, device, dtype=torch.bfloat16)
    y, g = _grads(lambda x, b, A, B: lora_ext.ops.lora_forward(x, b, A, B, 2.0, 0.0, 0), [x, base_out, A, B])
    y_ref, g_ref = _grads(lambda x, b, A, B: R.lora_forward(x, b, A, B, 2.0)[0],
                          [t.double() for t in (x, base_out, A, B)])
    assert y.dtype == torch.bfloat16 and g[2].dtype == torch.float32
    _close(y, y_ref, 2e-2)
    for a, b in zip(g, g_ref):
        _close(a, b, 2e-2)


@pytest.mark.parametrize("act, adapter", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                          (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_outputs_rounded_once_from_fp32(device, act, adapter):
    """y and dx are computed in fp32 and rounded once to the activations' dtype, whatever the adapters
    are stored in: against the fp64 reference rounded once, all within one ulp and nearly all equal
    (rounding the LoRA term and the sum separately would miss in a large share of elements). x is
    3-D and non-contiguous; dropout is on."""
    K, N, r, p, seed = 203, 77, 12, 0.2, 31
    x = torch.randn(37, 3, K, device=device).to(act).transpose(0, 1)
    base_out = torch.randn(3, 37, N, device=device).to(act)
    A = (torch.randn(r, K, device=device) / math.sqrt(K)).to(adapter)
    B = torch.randn(N, r, device=device).to(adapter)
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, base_out, A, B)]
    inputs64 = [t.detach().double().requires_grad_(True) for t in (x, base_out, A, B)]
    y = lora_ext.ops.lora_forward(*inputs, 1.7, p, seed)
    y_ref = R.lora_forward(*inputs64, 1.7, p, seed)[0]
    dy = torch.randn_like(y)  # the same (rounded) values for both
    g = torch.autograd.grad(y, inputs, dy)
    g_ref = torch.autograd.grad(y_ref, inputs64, dy.double())
    assert y.dtype == act and g[0].dtype == act and g[2].dtype == adapter and g[3].dtype == adapter
    for ours, ref in [(y, y_ref), (g[0], g_ref[0])]:
        ref_once = ref.to(act)
        miss = (ours.double() - ref_once.double()).abs() > 0
        fp32_sums = 1e-6 * ref.abs().max().item()  # where a sum cancels, fp32's error outweighs an ulp
        assert ((ours.double() - ref.double()).abs() <= ulp(ref_once) + fp32_sums).all()
        if act != torch.float32:  # 16-bit outputs: fp32's own error rarely moves the rounding
            assert miss.double().mean().item() < 0.01, miss.double().mean().item()
    for ours, ref in zip(g[2:], g_ref[2:]):  # dA, dB: fp32 sums rounded once to the adapters' dtype
        _close(ours, ref, 1e-5 if adapter == torch.float32 else 1e-2)


_CPU_KERNEL_CASES = """
import os, sys, torch, lora_ext
torch.manual_seed(0)
out = {}
for act in (torch.float32, torch.bfloat16, torch.float16):
    for M, K, N, r in [(37, 203, 77, 12), (1, 5, 3, 1), (9, 64, 16, 14), (35, 17, 300, 64)]:
        x, base = torch.randn(M, K).to(act), torch.randn(M, N).to(act)
        A, B = torch.randn(r, K) / K ** 0.5, torch.randn(N, r) / r ** 0.5
        g, bias = torch.rand(N) + 0.5, torch.randn(N)
        y, T = torch.ops.lora_ext.lora_forward(x, base, A, B, 1.7, 0.0, 0)
        dy, dxb = torch.randn(M, N).to(act), torch.randn(M, K).to(act)
        grads = torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 1.7, 0.0, 0, dxb)
        dora_y, _ = torch.ops.lora_ext.dora_forward(x, base, A, B, g, bias, 1.7)
        dora_grads = torch.ops.lora_ext.dora_backward(dy, x, base, T, A, B, g, 1.7, dxb)
        for name, t in [("y", y), ("T", T), *zip(("dx", "dA", "dB"), grads), ("dora_y", dora_y),
                        *zip(("dora_dx", "dora_dA", "dora_dB"), dora_grads[:3])]:
            out[f"{act}-{M}-{K}-{N}-{r}-{name}"] = t
torch.save(out, os.path.join(sys.argv[1], os.environ["LORA_EXT_DISABLE_SIMD"] + ".pt"))
print(0.0)
"""


def test_cpu_kernel_simd_and_portable_paths_agree(tmp_path):
    """The CPU products (lora_gemm_cpu.cpp) on both paths, in fresh processes: the AVX2/FMA kernel and the
    portable loop (LORA_EXT_DISABLE_SIMD=1) do the same fused multiply-adds in the same order, so y, T, dx, dA,
    dB and DoRA's y (its g and bias in the epilogue) are the same bits. Partial 16-column tiles, K not a multiple
    of 8, 1 to 5 rows left over (of 6-row blocks), Q read packed (P of many rows) and where it lies (dA and dB
    for r <= 32); outputs in fp32, bf16 and fp16. The default path is checked against fp64 by the tests above."""
    script = f"import sys; sys.argv = ['-', {str(tmp_path)!r}]\n" + _CPU_KERNEL_CASES
    assert [flag for flag, _ in on_each_simd_path(script)] == ["0", "1"]
    simd, portable = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert simd.keys() == portable.keys() and len(simd) == 3 * 4 * 9
    for key, t in simd.items():
        assert t.dtype == portable[key].dtype and torch.equal(t, portable[key]), key


@requires_cuda
@pytest.mark.parametrize("M, K, N, r, p", [(1, 1, 1, 1, 0.0), (7, 4097, 33, 12, 0.1), (4096, 300, 260, 64, 0.3),
                                           (2048, 129, 65, 256, 0.0), (333, 5, 4100, 3, 0.5)])
def test_cuda_kernels_match_the_cpu_operator(M, K, N, r, p):
    """The CUDA low-rank kernels against the CPU operator (their twin) on the same fp32 inputs: odd
    sizes, one-element tiles, several column tiles (r = 256), split-K reductions over 4096 tokens."""
    x, base_out, A, B = _lora_inputs((M,), K, N, r, "cpu")
    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = _grads(lambda x, b, A, B: lora_ext.ops.lora_forward(x, b, A, B, 0.75, p, 17),
                           [t.to(dev) for t in (x, base_out, A, B)])
    (y, g), (y_cpu, g_cpu) = outs["cuda"], outs["cpu"]
    _close(y.cpu(), y_cpu, 1e-5)
    for a, b in zip(g, g_cpu):
        _close(a.cpu(), b, 1e-5)
        assert a.stride() == b.stride()
    if p > 0:
        assert torch.equal(g[0].cpu() == 0, g_cpu[0] == 0), "the same elements of x dropped on both devices"
    # The layer op's backward: the base's dx as the dx epilogue's addend, in x's dtype or wider.
    dy, T = torch.randn(M, N), torch.randn(M, r)
    for base_dx in (torch.randn(M, K), torch.randn(M, K).bfloat16()):
        cpu = torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 0.75, p, 17, base_dx)
        gpu = torch.ops.lora_ext.lora_backward(*(t.cuda() for t in (dy, x, T, A, B)), 0.75, p, 17, base_dx.cuda())
        for a, b in zip(gpu, cpu):
            _close(a.cpu(), b, 1e-5)


@requires_cuda
@pytest.mark.parametrize("M, K, N, r, p", [(4096, 300, 260, 12, 0.2), (1000, 4097, 64, 64, 0.0),
                                           (333, 128, 4100, 80, 0.5)])
def test_cuda_tensor_core_kernel_matches_cuda_cores_and_the_cpu(monkeypatch, M, K, N, r, p):
    """bf16 activations: every product on the tensor-core kernel (lora_gemm_tc.cuh), against the same
    products on the CUDA-core kernel (LORA_EXT_TENSOR_CORES=0) and the CPU operator: fp32-grade."""
    x, base_out, A, B = _lora_inputs((M,), K, N, r, "cpu", dtype=torch.bfloat16)
    dy = torch.randn(M, N).bfloat16()
    results = {}
    for name, env in [("tc", "1"), ("cuda_cores", "0")]:
        monkeypatch.setenv("LORA_EXT_TENSOR_CORES", env)
        xg, bg, Ag, Bg, dyg = (t.cuda() for t in (x, base_out, A, B, dy))
        y, T = torch.ops.lora_ext.lora_forward(xg, bg, Ag, Bg, 0.75, p, 17)
        results[name] = (y, T, *torch.ops.lora_ext.lora_backward(dyg, xg, T, Ag, Bg, 0.75, p, 17))
    y, T = torch.ops.lora_ext.lora_forward(x, base_out, A, B, 0.75, p, 17)
    results["cpu"] = (y, T, *torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 0.75, p, 17))
    for i, name in enumerate(("y", "T", "dx", "dA", "dB")):
        tol = 1e-5 if results["cpu"][i].dtype == torch.float32 else 1e-2
        _close(results["tc"][i].cpu(), results["cuda_cores"][i].cpu(), tol)
        _close(results["tc"][i].cpu(), results["cpu"][i], tol)


def test_opcheck(device):
    x, base_out, A, B = _lora_inputs((6,), 40, 24, 4, device)
    x.requires_grad_(True)
    A.requires_grad_(True)
    torch.library.opcheck(torch.ops.lora_ext.lora_dropout.default, (x.detach(), 0.25, 5))
    torch.library.opcheck(torch.ops.lora_ext.lora_forward.default, (x, base_out, A, B, 0.5, 0.25, 5))
    y, T = torch.ops.lora_ext.lora_forward(x.detach(), base_out, A.detach(), B, 0.5, 0.25, 5)
    torch.library.opcheck(torch.ops.lora_ext.lora_backward.default,
                          (torch.randn_like(y), x.detach(), T, A.detach(), B, 0.5, 0.25, 5))


# ---------------------------------------------------------------- the layer as one operator


def _base(kind, K, N, bias, device, dtype):
    dense = nn.Linear(K, N, bias=bias).to(device=device, dtype=dtype).requires_grad_(False)
    return lora_ext.NF4Linear.from_linear(dense) if kind == "nf4" else dense


def _two_op_path(layer):
    """The same layer computed as base_layer's node plus lora_forward's (a hook on the base keeps
    LoraLinear from computing the base itself; this one changes nothing)."""
    layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    assert not lora_ext.lora.runs_as_one_op(layer.base_layer)
    return layer


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_layer_is_one_node_and_equals_the_two_op_path(device, kind, dtype, bias):
    """LoraLinear over a plain base is one autograd node (lora_linear / lora_nf4_linear's, in C++) whose backward
    writes dx once. Against the same layer run as two nodes: y, dA and dB bit for bit; dx to the
    dtype's tolerance (the two-node path rounds the LoRA part before autograd adds the base's dx).
    3-D non-contiguous x, dropout on."""
    K, N, r = 160, 72, 12
    fused = lora_ext.LoraLinear(_base(kind, K, N, bias, device, dtype), r=r, lora_alpha=24, lora_dropout=0.2,
                                init_lora_weights=False)
    two = _two_op_path(lora_ext.LoraLinear(_base(kind, K, N, bias, device, dtype), r=r, lora_alpha=24,
                                           lora_dropout=0.2))
    two.load_state_dict(fused.state_dict())
    x = torch.randn(9, 2, K, device=device).to(dtype).transpose(0, 1)
    outs = []
    for layer in (fused, two):
        torch.manual_seed(7)  # the same dropout seed
        y, (gx,) = _grads(layer, [x])
        outs.append((y, gx, layer.lora_A.grad, layer.lora_B.grad, backward_nodes(layer, x)))
    (y, gx, gA, gB, nodes), (y2, gx2, gA2, gB2, nodes2) = outs
    op = f"lora_ext::lora::Lora{'Nf4' if kind == 'nf4' else ''}LinearFunction"  # the op's C++ autograd node
    assert len(nodes) == 1 and op in nodes[0], nodes
    assert any("lora_forward" in n for n in nodes2) and len(nodes2) > 1, nodes2
    assert torch.equal(y, y2) and torch.equal(gA, gA2) and torch.equal(gB, gB2)
    assert gx.dtype == x.dtype
    _close(gx, gx2, 1e-5 if dtype == torch.float32 else 1e-2)


def test_layer_dx_rounded_once(device):
    """bf16: the layer's dx is the base's dx plus the fp32 LoRA part, rounded once; against fp64 of the
    same sum nearly every element is equal (adding a rounded LoRA part misses far more often)."""
    K, N, r = 256, 192, 16
    layer = lora_ext.LoraLinear(_base("dense", K, N, True, device, torch.bfloat16), r=r, lora_alpha=32,
                                init_lora_weights=False)
    x = torch.randn(300, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(300, N, device=device, dtype=torch.bfloat16)
    layer(x).backward(dy)
    W, A, B = (t.detach() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
    base_dx = dy @ W  # the base's own dx, rounded by its matmul as in the layer
    lora_dx = layer.scaling * (dy.double() @ B.double()) @ A.double()
    exact_once = (base_dx.double() + lora_dx).to(torch.bfloat16)
    twice = base_dx + lora_dx.to(torch.bfloat16)
    miss_once = (x.grad != exact_once).double().mean().item()
    miss_twice = (twice != exact_once).double().mean().item()
    assert miss_once < 0.01 and miss_once < miss_twice / 5, (miss_once, miss_twice)


def test_layer_ops_gradcheck_fp64_cpu():
    x, _, A, B = (t.double() for t in _lora_inputs((2, 3), 64, 7, 3, "cpu"))
    W, b = torch.randn(7, 64, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    qw = lora_ext.quantize_nf4(torch.randn(7, 64), blocksize=32)
    nf4_args = (qw.packed, qw.absmax, 7, 32, b, qw.nested_absmax, qw.nested_code, qw.offset, qw.nested_blocksize)
    inputs = [t.requires_grad_(True) for t in (x, A, B)]
    for p in (0.0, 0.4):
        assert torch.autograd.gradcheck(lambda x, A, B: lora_ext.ops.lora_linear(x, W, b, A, B, 1.5, p, 99), inputs)
        assert torch.autograd.gradcheck(lambda x, A, B: lora_ext.ops.lora_nf4_linear(x, *nf4_args, A, B, 1.5, p, 99),
                                        inputs)


def test_layer_ops_against_reference(device):
    """lora_linear and lora_nf4_linear, outputs and gradients, against the fp64 reference composed
    from the base op and lora_forward / lora_backward(grad_x_base)."""
    K, N, r, p, seed = 96, 40, 8, 0.3, 5
    x, _, A, B = _lora_inputs((3, 5), K, N, r, device)
    W, b = torch.randn(N, K, device=device) / math.sqrt(K), torch.randn(N, device=device)
    qw = lora_ext.quantize_nf4(W, blocksize=64)
    W4 = qw.dequantize(torch.float32)
    nf4_args = (qw.packed, qw.absmax, N, qw.blocksize, b, qw.nested_absmax, qw.nested_code, qw.offset,
                qw.nested_blocksize)
    cases = [(lambda x, A, B: lora_ext.ops.lora_linear(x, W, b, A, B, 0.5, p, seed), W),
             (lambda x, A, B: lora_ext.ops.lora_nf4_linear(x, *nf4_args, A, B, 0.5, p, seed), W4)]
    for op, w in cases:
        y, g = _grads(op, [x, A, B])
        y_ref, g_ref = _grads(lambda x, A, B: R.lora_linear(x, w.double(), b.double(), A, B, 0.5, p, seed)[0],
                              [t.double() for t in (x, A, B)])
        _close(y, y_ref, 1e-5)
        for a, b_ in zip(g, g_ref):
            _close(a, b_, 1e-5)
    dy, T = torch.randn(15, N, device=device), torch.randn(15, r, device=device)
    base_dx = torch.randn(15, K, device=device)
    ours = torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 0.5, p, seed, base_dx)
    ref = R.lora_backward(dy.double(), x.double(), T.double(), A.double(), B.double(), 0.5, p, seed, base_dx.double())
    for a, b_ in zip(ours, ref):
        _close(a, b_, 1e-5)


def test_layer_ops_opcheck(device):
    x, _, A, B = _lora_inputs((6,), 40, 24, 4, device)
    W, b = torch.randn(24, 40, device=device), torch.randn(24, device=device)
    qw = lora_ext.quantize_nf4(W)
    x.requires_grad_(True)
    A.requires_grad_(True)
    torch.library.opcheck(torch.ops.lora_ext.lora_linear.default, (x, W, b, A, B, 0.5, 0.25, 5))
    torch.library.opcheck(torch.ops.lora_ext.lora_nf4_linear.default,
                          (x, qw.packed, qw.absmax, 24, qw.blocksize, b, qw.nested_absmax, qw.nested_code, qw.offset,
                           qw.nested_blocksize, A, B, 0.5, 0.25, 5))
    y, T = torch.ops.lora_ext.lora_forward(x.detach(), torch.randn(6, 24, device=device), A.detach(), B, 0.5, 0.25, 5)
    torch.library.opcheck(torch.ops.lora_ext.lora_backward.default,
                          (torch.randn_like(y), x.detach(), T, A.detach(), B, 0.5, 0.25, 5, torch.randn_like(x)))


def test_base_runs_inside_the_layer_op_only_when_its_forward_is_x_wT_plus_b():
    """Anything else a base's forward may do (a subclass, a hook, a patched forward, a trainable
    weight) keeps it a node of its own, and what it does shows in y and dx."""
    one_op = lora_ext.lora.runs_as_one_op
    assert one_op(nn.Linear(8, 6).requires_grad_(False))
    assert one_op(lora_ext.NF4Linear.from_linear(nn.Linear(64, 6)).requires_grad_(False))
    assert not one_op(lora_ext.NF4Linear.from_linear(nn.Linear(64, 6)))  # trainable bias

    class MyLinear(nn.Linear):
        pass
    assert not one_op(MyLinear(8, 6).requires_grad_(False))
    assert not one_op(nn.Linear(8, 6))  # trainable weight
    patched = nn.Linear(8, 6).requires_grad_(False)
    patched.forward = lambda x: nn.Linear.forward(patched, x)
    assert not one_op(patched)
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
    try:
        assert not one_op(nn.Linear(8, 6).requires_grad_(False))
    finally:
        handle.remove()

    layer = lora_ext.LoraLinear(nn.Linear(32, 16), r=4, lora_alpha=4, init_lora_weights=False)
    layer.base_layer.register_forward_hook(lambda m, args, out: 2 * out)
    x = torch.randn(5, 32)
    W, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    y, (gx,) = _grads(layer, [x])
    y_ref, (gx_ref,) = _grads(lambda x: R.lora_linear(x, 2 * W.double(), 2 * bias.double(), layer.lora_A.double(),
                                                      layer.lora_B.double(), layer.scaling)[0], [x.double()])
    _close(y, y_ref, 1e-5)
    _close(gx, gx_ref, 1e-5)


def test_layer_under_autocast_equals_the_two_op_path():
    """An fp32 model under bf16 autocast: the base product runs in bf16 inside the layer op as it would
    in nn.Linear, and the LoRA products stay fp32 (autocast must not recast the ATen math inside our
    kernels), so y, dA and dB equal the two-node path's bit for bit, and dx to fp32's rounding (BLAS
    adds the base's dx inside its product here)."""
    fused = lora_ext.LoraLinear(nn.Linear(64, 48), r=8, lora_alpha=16, init_lora_weights=False)
    two = _two_op_path(lora_ext.LoraLinear(nn.Linear(64, 48), r=8, lora_alpha=16))
    two.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 64)
    results = []
    for layer in (fused, two):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, (gx,) = _grads(layer, [x])
        results.append([y, gx, layer.lora_A.grad, layer.lora_B.grad])
    assert results[0][0].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dA", "dB"), *results):
        if name == "dx":
            _close(a, b, 1e-6)
        else:
            assert torch.equal(a, b), name


def test_ops_keep_fp32_math_under_autocast(device):
    """Autocast passes our operators through; the BLAS calls inside the CPU operator must not be recast
    to bf16 either: the same bits with and without it."""
    x, base_out, A, B = _lora_inputs((37,), 64, 48, 8, device)
    dy, base_dx = torch.randn_like(base_out), torch.randn_like(x)

    def run():
        y, T = torch.ops.lora_ext.lora_forward(x, base_out, A, B, 1.5, 0.1, 3)
        return (y, T, *torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 1.5, 0.1, 3, base_dx))
    plain = run()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        under = run()
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_layer_ops_reject_bad_input(device):
    x, _, A, B = _lora_inputs((4,), 32, 16, 4, device)
    W = torch.randn(16, 32, device=device)
    with pytest.raises(RuntimeError, match=r"weight must be \(out_features, 32\), got \[16, 31\]"):
        lora_ext.ops.lora_linear(x, W[:, :31], None, A, B, 1.0)
    with pytest.raises(RuntimeError, match="the base weight and bias are frozen here"):
        lora_ext.ops.lora_linear(x, W.clone().requires_grad_(True), None, A.clone().requires_grad_(True), B, 1.0)
    T = torch.randn(4, 4, device=device)
    with pytest.raises(RuntimeError, match="grad_x_base must have the input's 128 elements"):
        torch.ops.lora_ext.lora_backward(torch.randn(4, 16, device=device), x, T, A, B, 1.0, 0.0, 0,
                                         torch.randn(4, 31, device=device))
    # T comes from the forward in A's dtype; another one is refused by the kernels and the fake kernel alike
    args = (torch.randn(4, 16, device=device), x, T.double(), A, B, 1.0, 0.0, 0, None)
    with pytest.raises(RuntimeError, match=r"lora_backward: T must be in lora_A's dtype \(the forward's T\), got "
                                           r"Double for Float"):
        torch.ops.lora_ext.lora_backward(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="lora_backward: T must be in lora_A's dtype"):
        torch.ops.lora_ext.lora_backward(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))
    # a trainable W through the functional form: the base is its own node and W gets its gradient
    Wt = W.clone().requires_grad_(True)
    lora_ext.lora.lora_linear(x, Wt, A, B, 1.0).sum().backward()
    assert Wt.grad is not None


# ---------------------------------------------------------------- LoraLinear


def _peft_layer(base, r, alpha, use_rslora, dropout=0.0):
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout, use_rslora=use_rslora,
                          init_lora_weights=False)
    model = peft.get_peft_model(Holder(), cfg)
    return model, model.base_model.model.proj


def _copy_adapters(ours, peft_layer):
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)


def _same_as_peft(ours, model, peft_layer, shapes, dtype, tol_y, tol_grad):
    """Output, dx, dA and dB of our layer and of PEFT's model, input by input."""
    for shape in shapes:
        x = torch.randn(*shape, dtype=dtype)
        y, (gx,) = _grads(ours, [x])
        y_p, (gx_p,) = _grads(model, [x])
        _close(y, y_p, tol_y)
        _close(gx, gx_p, tol_grad)
        _close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad, tol_grad)
        _close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad, tol_grad)
        for m in (ours, model):
            m.zero_grad()


@pytest.mark.parametrize("r,use_rslora,bias", [(1, False, True), (8, True, False), (12, False, False),
                                               (16, False, True), (64, True, True), (256, True, False)])
def test_matches_peft_dense(r, use_rslora, bias):
    base = nn.Linear(300, 280, bias=bias)
    ours = lora_ext.LoraLinear(nn.Linear(300, 280, bias=bias), r=r, lora_alpha=2 * r, use_rslora=use_rslora)
    ours.base_layer.load_state_dict(base.state_dict())
    model, peft_layer = _peft_layer(base, r, 2 * r, use_rslora)
    _copy_adapters(ours, peft_layer)
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])
    _same_as_peft(ours, model, peft_layer, [(1, 300), (7, 300), (2, 5, 300), (4096, 300)], torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("r", [1, 16, 64])
def test_matches_peft_on_bitsandbytes_4bit_base(r):
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(128, 64).to(torch.bfloat16)
    l4 = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
    l4.bias = nn.Parameter(dense.bias.detach().clone())
    l4 = l4.to("cpu")
    nf4 = lora_ext.NF4Linear(128, 64, dtype=torch.bfloat16)
    nf4.load_state_dict(l4.state_dict())
    ours = lora_ext.LoraLinear(nf4, r=r, lora_alpha=2 * r)
    model, peft_layer = _peft_layer(l4, r, 2 * r, False)
    _copy_adapters(ours, peft_layer)
    _same_as_peft(ours, model, peft_layer, [(1, 128), (9, 128), (2, 5, 128)], torch.bfloat16, 2e-2, 3e-2)


def test_qlora_against_fp64_reference(device):
    dense = nn.Linear(4097 // 16 * 2, 72).to(device)
    ours = lora_ext.LoraLinear(lora_ext.NF4Linear.from_linear(dense), r=12, lora_alpha=24, init_lora_weights=False)
    x = torch.randn(2, 7, dense.in_features, device=device)
    y, (gx,) = _grads(ours, [x])
    qw = ours.base_layer.qweight
    w64 = R.dequantize_nf4(qw.packed, qw.absmax, qw.blocksize, qw.shape, torch.float64, qw.nested_absmax,
                           qw.nested_code, qw.offset, compute_dtype=torch.float64)

    def ref(x):
        base = x @ w64.t() + ours.base_layer.bias.double()
        return R.lora_forward(x, base, ours.lora_A.double(), ours.lora_B.double(), ours.scaling)[0]
    y_ref, (gx_ref,) = _grads(ref, [x.double()])
    _close(y, y_ref, 1e-5)
    _close(gx, gx_ref, 1e-5)
    assert ours.base_layer.weight.grad is None


def test_saved_for_backward_smaller_than_peft():
    """bf16 activations, fp32 adapters (PEFT's default), dropout on: PEFT keeps dropout(x) cast to
    fp32 and the mask; we keep x (shared with the base layer) and T."""
    torch.manual_seed(0)
    base = nn.Linear(512, 512, bias=False).to(torch.bfloat16)
    ours = lora_ext.LoraLinear(nn.Linear(512, 512, bias=False).to(torch.bfloat16), r=16, lora_alpha=16,
                               lora_dropout=0.1)
    ours.base_layer.load_state_dict(base.state_dict())
    model, _ = _peft_layer(base, 16, 16, False, dropout=0.1)

    def saved_bytes(module):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        x = torch.randn(256, 512, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(x)
        y.float().sum().backward()
        params = {p.data_ptr() for p in module.parameters()}
        return sum(b for (ptr, _, _), b in seen.items() if ptr not in params)

    ours_b, peft_b = saved_bytes(ours.train()), saved_bytes(model.train())
    assert ours_b < peft_b, (ours_b, peft_b)
    assert ours_b <= 256 * 512 * 2 + 256 * 16 * 4  # x (bf16) + T (fp32)


def test_init_like_peft_and_deterministic():
    torch.manual_seed(3)
    a = lora_ext.LoraLinear(nn.Linear(200, 100), r=8, lora_alpha=16)
    torch.manual_seed(3)
    b = lora_ext.LoraLinear(nn.Linear(200, 100), r=8, lora_alpha=16)
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, torch.zeros(100, 8))
    bound = 1 / math.sqrt(200)  # kaiming_uniform(a=sqrt(5)) on fan_in 200
    assert a.lora_A.abs().max() <= bound and a.lora_A.abs().max() > 0.9 * bound
    g = lora_ext.LoraLinear(nn.Linear(2000, 1000), r=16, lora_alpha=16, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.005 and not g.lora_B.any()
    x = torch.randn(3, 200)
    torch.testing.assert_close(a(x), a.base_layer(x))  # B = 0: the update starts at zero


def test_rslora_scaling():
    layer = lora_ext.LoraLinear(nn.Linear(300, 300), r=64, lora_alpha=16, use_rslora=True)
    assert layer.scaling == pytest.approx(16 / 8)
    assert lora_ext.LoraLinear(nn.Linear(300, 300), r=64, lora_alpha=16).scaling == pytest.approx(0.25)


def test_dropout_only_in_training_and_reproducible():
    layer = lora_ext.LoraLinear(nn.Linear(64, 64), r=8, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(16, 64)
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, layer(x))
    layer.eval()
    ref = R.lora_forward(x, layer.base_layer(x), layer.lora_A, layer.lora_B, layer.scaling)[0]
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"r must be an integer in \[1, min\(in_features, out_features\)\] = \[1, 32\], got 0"),
    (dict(r=33), r"= \[1, 32\], got 33"),
    (dict(r=4, lora_alpha=-1), "lora_alpha must be >= 0, got -1"),
    (dict(r=4, lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(r=4, init_lora_weights="pisa"), "init_lora_weights must be one of True, False, 'gaussian', 'pissa'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_ext.LoraLinear(nn.Linear(48, 32), **kwargs)
    with pytest.raises(TypeError, match="wraps an nn.Linear, an NF4Linear or a Hugging Face Conv1D, got Conv1d"):
        lora_ext.LoraLinear(nn.Conv1d(4, 4, 1), r=2)


def test_op_rejects_mismatched_adapters(device):
    x, base_out, A, B = _lora_inputs((4,), 32, 16, 4, device)
    with pytest.raises(RuntimeError, match=r"lora_A must be \(r, 32\) for inputs with 32 features"):
        lora_ext.ops.lora_forward(x, base_out, A[:, :31], B, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must be \(out_features, 4\)"):
        lora_ext.ops.lora_forward(x, base_out, A, B[:, :3], 1.0)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        lora_ext.ops.lora_forward(x, base_out, A, B.double(), 1.0)
    with pytest.raises(RuntimeError, match="base output must have the input's leading dims and 16 features"):
        lora_ext.ops.lora_forward(x, base_out[:, :15], A, B, 1.0)
    with pytest.raises(RuntimeError, match=r"dropout must be in \[0, 1\), got 1.5"):
        lora_ext.ops.lora_forward(x, base_out, A, B, 1.0, 1.5)



@requires_cuda
def test_cuda_ops_name_a_tensor_on_another_device():
    """A CPU input with CUDA adapters (or the reverse) dispatches to the CUDA kernel, which must check
    devices before it builds its device guard: our message, not a c10 assert from the guard."""
    x, base_out, A, B = _lora_inputs((4,), 32, 16, 4, "cuda")
    T = torch.randn(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="lora_A must be on cpu, got cuda"):
        lora_ext.ops.lora_forward(x.cpu(), base_out.cpu(), A, B, 1.0)
    with pytest.raises(RuntimeError, match="lora_A must be on cpu, got cuda"):
        torch.ops.lora_ext.lora_backward(base_out.cpu(), x.cpu(), T.cpu(), A, B, 1.0, 0.0, 0, None)
    with pytest.raises(RuntimeError, match="grad_x_base must be on cuda:0, got cpu"):
        torch.ops.lora_ext.lora_backward(base_out, x, T, A, B, 1.0, 0.0, 0, x.cpu())

@pytest.mark.parametrize("use_dora", [False, True])
def test_compile_checkpoint_autocast(device, use_dora):
    """torch.compile(fullgraph=True), both checkpointing modes and bf16 autocast give the eager layer's output
    and gradients (x, A, and with DoRA also B and the magnitude)."""
    layer = lora_ext.LoraLinear(nn.Linear(64, 48), r=8, lora_alpha=16, init_lora_weights=False,
                                use_dora=use_dora).to(device)
    x = torch.randn(5, 64, device=device, requires_grad=True)
    checked = [x, layer.lora_A] + ([layer.lora_B, layer.lora_magnitude_vector] if use_dora else [])
    y_ref = layer(x)
    y_ref.sum().backward()
    refs = [t.grad.clone() for t in checked]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for run in (lambda x: compiled(x),
                lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True),
                lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)):
        x.grad = None
        layer.zero_grad()
        y = run(x)
        y.sum().backward()
        torch.testing.assert_close(y, y_ref)
        for t, ref in zip(checked, refs):
            torch.testing.assert_close(t.grad, ref)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2 * y_ref.abs().max().item())
