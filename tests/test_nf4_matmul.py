"""nf4_linear: fused small-M kernel and workspace+BLAS large-M path, forward and input gradient,
against the fp64 reference (dequantize in fp64, then matmul)."""
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import reference as R
from lora_ext.bench.machine import cpu_flags

from conftest import requires_c, requires_cuda

pytestmark = requires_c

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
ALL_M = [1, 2, 3, 8, 16, 17, 64, 257]
GEMV_ALWAYS, GEMV_NEVER = 1 << 20, 0


def _weight(N, K, blocksize, double_quant, device, dtype=torch.bfloat16):
    w = (torch.randn(N, K) * 0.05).to(device=device, dtype=dtype)
    return lora_ext.quantize_nf4(w, blocksize, double_quant)


def _ref(x, qw, bias=None):
    return R.nf4_linear(x, qw.packed, qw.absmax, qw.shape[0], qw.blocksize, bias, qw.nested_absmax, qw.nested_code,
                        qw.offset, compute_dtype=torch.float64)


def _close(y, ref, dtype):
    scale = ref.abs().max().item() + 1e-30
    torch.testing.assert_close(y.double(), ref.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _call(x, qw, bias=None, gemv_max_m=-1):
    return lora_ext.ops.nf4_linear(x, qw.packed, qw.absmax, qw.shape[0], qw.blocksize, bias, qw.nested_absmax,
                                   qw.nested_code, qw.offset, qw.nested_blocksize, gemv_max_m)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_all_m_both_paths(device, dtype, double_quant):
    qw = _weight(33, 4097, 64, double_quant, device)  # K: not a multiple of the blocksize, odd
    bias = torch.randn(33, device=device, dtype=dtype)
    for i, M in enumerate(ALL_M):
        x = torch.randn(M, 4097, device=device, dtype=dtype)
        b = bias if i % 2 else None
        ref = _ref(x, qw, b)
        _close(lora_ext.nf4_linear(x, qw, b), ref, dtype)
        _close(_call(x, qw, b, GEMV_ALWAYS), ref, dtype)
        _close(_call(x, qw, b, GEMV_NEVER), ref, dtype)


@pytest.mark.parametrize("dtype, flag", [(torch.bfloat16, "avx512_bf16"), (torch.float16, "avx512_fp16")])
def test_cpu_16bit_gemm_where_the_cpu_has_it(monkeypatch, dtype, flag):
    """Past the GEMV, a CPU with native 16-bit dot products (the /proc/cpuinfo flag) takes the product in the
    activations' dtype: bit for bit bitsandbytes' recipe, W dequantized to that dtype then torch's matmul
    (fp32 accumulation). Elsewhere, and with LORA_EXT_CPU_16BIT_GEMM=0, W and x go to fp32 and the result is
    rounded once. Both within tolerance of fp64, forward and input gradient; bias, odd shapes."""
    qw = _weight(45, 197, 64, True, "cpu")
    x, bias, dy = torch.randn(37, 197).to(dtype), torch.randn(45).to(dtype), torch.randn(37, 45).to(dtype)
    w16, w32 = lora_ext.dequantize_nf4(qw, dtype), lora_ext.dequantize_nf4(qw, torch.float32)
    grad_in = lambda: torch.ops.lora_ext.nf4_linear_grad_input(  # noqa: E731
        dy, qw.packed, qw.absmax, 197, 64, qw.nested_absmax, qw.nested_code, qw.offset, qw.nested_blocksize)
    native = flag in cpu_flags()
    for env in (None, "0"):
        if env is None:
            monkeypatch.delenv("LORA_EXT_CPU_16BIT_GEMM", raising=False)
        else:
            monkeypatch.setenv("LORA_EXT_CPU_16BIT_GEMM", env)
        y, dx = _call(x, qw, bias), grad_in()
        if native and env is None:
            assert torch.equal(y, torch.nn.functional.linear(x, w16, bias)) and torch.equal(dx, dy @ w16)
        else:
            assert torch.equal(y, torch.addmm(bias.float(), x.float(), w32.t()).to(dtype))
            assert torch.equal(dx, (dy.float() @ w32).to(dtype))
        _close(y, _ref(x, qw, bias), dtype)
        _close(dx, R.nf4_linear_grad_input(dy.double(), qw.packed, qw.absmax, 197, 64, qw.nested_absmax,
                                           qw.nested_code, qw.offset, compute_dtype=torch.float64), dtype)


@pytest.mark.parametrize("M,K,N,blocksize", [
    (2048, 96, 65, 64), (1, 11008, 64, 64), (3, 64, 11008, 128), (17, 1, 5, 32), (1, 7, 1, 32),
    (16, 4096, 48, 4096), (5, 4097, 3, 4096), (64, 11008, 17, 64),
])
def test_forward_odd_shapes(device, M, K, N, blocksize):
    dtype = torch.bfloat16
    qw = _weight(N, K, blocksize, True, device)
    bias = torch.randn(N, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    ref = _ref(x, qw, bias)
    _close(lora_ext.nf4_linear(x, qw, bias), ref, dtype)
    _close(_call(x, qw, bias, GEMV_ALWAYS), ref, dtype)


def test_three_d_and_non_contiguous_input(device):
    qw = _weight(40, 256, 64, True, device)
    x = torch.randn(256, 3, 5, device=device, dtype=torch.float16).permute(1, 2, 0)  # (3, 5, 256), strided
    assert not x.is_contiguous()
    for max_m in (GEMV_ALWAYS, GEMV_NEVER):
        y = _call(x, qw, None, max_m)
        assert y.shape == (3, 5, 40)
        _close(y, _ref(x, qw), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, dtype):
    qw = _weight(24, 320, 64, True, device)
    bias = torch.randn(24, device=device, dtype=dtype, requires_grad=True)
    for M in (1, 9, 300):
        x = torch.randn(2, M, 320, device=device, dtype=dtype, requires_grad=True)
        y = lora_ext.nf4_linear(x, qw, bias)
        dy = torch.randn_like(y)
        y.backward(dy)
        w64 = R.dequantize_nf4(qw.packed, qw.absmax, 64, (24, 320), torch.float64, qw.nested_absmax, qw.nested_code,
                               qw.offset, compute_dtype=torch.float64)
        _close(x.grad, dy.double() @ w64, dtype)
        _close(bias.grad, dy.double().sum((0, 1)), dtype)
        bias.grad = None


def test_gradcheck_fp64_cpu():
    qw = _weight(6, 70, 32, True, "cpu")
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: lora_ext.nf4_linear(x, qw, b), (x, bias))


def test_weight_gets_no_gradient():
    layer = lora_ext.NF4Linear.from_linear(nn.Linear(64, 8), quant_storage=torch.bfloat16)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="NF4 base weight is frozen and has no gradient"):
        layer(x)


def test_checkpoint_and_compile(device):
    layer = lora_ext.NF4Linear.from_linear(nn.Linear(128, 64)).to(device)
    x = torch.randn(5, 128, device=device, requires_grad=True)
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    for reentrant in (True, False):
        xc = x.detach().clone().requires_grad_(True)
        y = torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=reentrant)
        y.sum().backward()  # reentrant checkpointing does not support autograd.grad
        assert torch.equal(y, y_ref) and torch.equal(xc.grad, g_ref)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("M", [3, 100])  # the fused path and the workspace + BLAS path
def test_autocast_does_not_lower_the_precision(device, M):
    """Autocast leaves our operators alone, and must not recast the BLAS call inside the kernel either:
    fp32 activations give the same fp32 result under bf16 autocast, forward and backward."""
    qw = _weight(96, 128, 64, True, device, torch.float32)
    x = torch.randn(M, 128, device=device, requires_grad=True)
    y = lora_ext.nf4_linear(x, qw)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y_ac = lora_ext.nf4_linear(x, qw)
        (g_ac,) = torch.autograd.grad(y_ac, x, torch.ones_like(y_ac))
    assert y_ac.dtype == torch.float32 and torch.equal(y_ac, y) and torch.equal(g_ac, g)


def test_opcheck(device):
    qw = _weight(12, 96, 32, True, device)
    x = torch.randn(3, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(12, device=device, dtype=torch.bfloat16)
    args = (x, qw.packed, qw.absmax, 12, 32, bias, qw.nested_absmax, qw.nested_code, qw.offset, 256, -1)
    torch.library.opcheck(torch.ops.lora_ext.nf4_linear.default, args)
    torch.library.opcheck(torch.ops.lora_ext.nf4_linear.default, (x.detach()[:1],) + args[1:5] + (None,) + args[6:])
    dy = torch.randn(3, 12, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.lora_ext.nf4_linear_grad_input.default,
                          (dy, qw.packed, qw.absmax, 96, 32, qw.nested_absmax, qw.nested_code, qw.offset, 256))


def test_bad_input_is_refused(device):
    qw = _weight(8, 64, 64, False, device)
    with pytest.raises(ValueError, match="last dimension must be in_features=64"):
        lora_ext.nf4_linear(torch.randn(2, 63, device=device), qw)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8,\)"):
        lora_ext.nf4_linear(torch.randn(2, 64, device=device), qw, torch.zeros(9, device=device))
    with pytest.raises(RuntimeError, match="bias must have the input's dtype"):
        lora_ext.nf4_linear(torch.randn(2, 64, device=device), qw, torch.zeros(8, device=device, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"input must be float32, float16 or bfloat16 \(or float64\), got Int"):
        _call(torch.ones(2, 64, device=device, dtype=torch.int32), qw)


def test_saved_for_backward_is_weights_only_no_dequantized_copy():
    """Backward keeps references to the packed weights (which the model holds anyway) and no
    activation: what a stack of NF4Linear adds for backward does not depend on the batch."""
    torch.manual_seed(0)
    layers = nn.Sequential(*[lora_ext.NF4Linear.from_linear(nn.Linear(256, 256)) for _ in range(6)])
    params = {p.data_ptr() for m in layers for p in (m.weight, m.absmax, m.nested_absmax, m.nested_code, m.offset)}

    def saved_new_bytes(batch):
        seen = []

        def pack(t):
            seen.append(t)
            return t
        x = torch.randn(batch, 256, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layers(x)
        y.sum().backward()
        assert all(t.dtype != torch.float32 or t.numel() != 256 * 256 for t in seen), "a dequantized weight was saved"
        return sum(t.numel() * t.element_size() for t in seen if t.data_ptr() not in params)

    assert saved_new_bytes(4) == saved_new_bytes(512) == 0


@requires_cuda
def test_cuda_peak_memory_grows_with_activations_not_weights():
    torch.manual_seed(0)
    L, D = 16, 4096
    layers = nn.Sequential(*[lora_ext.NF4Linear.from_linear(nn.Linear(D, D, dtype=torch.bfloat16)) for _ in range(L)])
    layers = layers.cuda()
    dense_layer = D * D * 2
    for batch in (8, 512):
        x = torch.randn(batch, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layers(x).float().sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        activations = L * batch * D * 2 * 3
        # One dequantized layer at a time (the workspace), never all of them.
        assert extra < activations + 3 * dense_layer, (batch, extra / 2**20)
