"""NF4 quantize / double-quantize / dequantize against bitsandbytes (packed bytes and state, bit for bit),
the format's definition (dequantized values) and lora_ext.reference."""
import math

import pytest
import torch

import lora_ext
from lora_ext import reference as R
from lora_ext.nf4 import NF4Weight

from conftest import requires_c, requires_cuda
from nf4_definition import dequantize_by_definition

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
except ImportError:  # only the tests that compare with it need it: the CUDA tests must still run
    bnb = BF = None
requires_bnb = pytest.mark.skipif(bnb is None, reason="needs bitsandbytes (the oracle for packed bytes and state)")

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 4096]
SHAPES = [(1, 1), (3, 5), (7, 1), (37, 53), (129, 257), (1, 4097)]


def _data(shape, dtype, device="cpu"):
    # Spread magnitudes across blocks so absmax differs block to block.
    x = torch.randn(*shape, dtype=torch.float32) * torch.exp(torch.randn(*shape) * 0.5)
    return x.to(device=device, dtype=dtype)


def _bnb_quantize(w, blocksize, double_quant, quant_storage=torch.uint8):
    return BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
                            quant_storage=quant_storage)


def _assert_same_as_bnb(qw: NF4Weight, packed, state):
    assert torch.equal(qw.data.cpu(), packed.cpu()), "packed bytes differ from bitsandbytes"
    assert torch.equal(qw.absmax.cpu(), state.absmax.cpu()), "absmax differs from bitsandbytes"
    if state.nested:
        assert torch.equal(qw.nested_absmax.cpu(), state.state2.absmax.cpu()), "nested absmax differs"
        assert torch.equal(qw.nested_code.cpu(), state.state2.code.cpu()), "nested code map differs"
        assert qw.offset.item() == state.offset.item(), "double-quant offset differs"
    else:
        assert not qw.double_quant


@requires_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_with_bitsandbytes(dtype, blocksize, double_quant):
    for shape in SHAPES:
        w = _data(shape, dtype)
        packed, state = _bnb_quantize(w, blocksize, double_quant)
        qw = lora_ext.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        _assert_same_as_bnb(qw, packed, state)
        assert qw.shape == w.shape and qw.dtype == dtype and qw.blocksize == blocksize
        for out_dtype in DTYPES:
            state.dtype = out_dtype
            ours = lora_ext.dequantize_nf4(qw, out_dtype)
            assert ours.dtype == out_dtype and ours.shape == w.shape
            assert torch.equal(ours, dequantize_by_definition(packed, state, out_dtype)), (shape, out_dtype)


@requires_bnb
@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_large_odd_shape(double_quant):
    w = _data((4097, 11008), torch.bfloat16)
    packed, state = _bnb_quantize(w, 64, double_quant)
    qw = lora_ext.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    _assert_same_as_bnb(qw, packed, state)
    assert torch.equal(qw.dequantize(), dequantize_by_definition(packed, state))


@requires_bnb
def test_double_quant_map_matches_bitsandbytes():
    assert torch.equal(R.dynamic_map(), BF.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_equals_reference(device, dtype, double_quant):
    for shape, blocksize in [((5, 77), 32), ((300, 301), 64), ((2, 4096 + 33), 4096), ((513,), 128)]:
        w = _data(shape, dtype, device)
        qw = lora_ext.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        packed, absmax = R.quantize_nf4(w, blocksize)
        assert torch.equal(qw.data, packed)
        if double_quant:
            q, nested, offset = R.double_quant(absmax, R.dynamic_map().to(device))
            assert torch.equal(qw.absmax, q) and torch.equal(qw.nested_absmax, nested)
            assert torch.equal(qw.offset, offset)
        else:
            assert torch.equal(qw.absmax, absmax)
        ref = R.dequantize_nf4(qw.packed, qw.absmax, blocksize, shape, dtype, qw.nested_absmax, qw.nested_code,
                               qw.offset)
        assert torch.equal(qw.dequantize(), ref)


@requires_bnb
def test_values_on_midpoints_take_the_lower_code():
    mids = R.nf4_midpoints()
    # One full block (scaled by 1/absmax) and a trailing partial block (divided by absmax).
    block = torch.cat([torch.tensor([1.0]), mids, mids[:-1].flip(0), torch.zeros(64 - 1 - 15 - 14)])
    tail = torch.cat([torch.tensor([-1.0]), mids, -mids])
    w = torch.cat([block, tail])
    expected_block = torch.cat([torch.tensor([15]), torch.arange(15), torch.arange(14).flip(0), torch.full((34,), 7)])
    qw = lora_ext.quantize_nf4(w, blocksize=64, double_quant=False)
    codes = R.unpack_nf4_codes(qw.data, w.numel())
    assert torch.equal(codes[:64], expected_block)
    assert torch.equal(codes[64:80], torch.cat([torch.tensor([0]), torch.arange(15)]))
    packed, _ = _bnb_quantize(w, 64, False)
    assert torch.equal(qw.data, packed)


@requires_bnb
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_nan_inf_blocks(device, dtype):
    w = _data((6, 64), dtype, device)
    w[0] = 0
    w[1, 5] = float("nan")
    w[2, 7] = float("inf")
    w[3, 9] = float("-inf")
    qw = lora_ext.quantize_nf4(w, blocksize=64, double_quant=False)
    out = qw.dequantize().float()
    assert torch.equal(out[0], torch.zeros(64, device=device)), "an all-zero block must dequantize to zeros"
    assert torch.isnan(out[1]).all(), "a block holding NaN dequantizes to NaN"
    assert out[2, 7] == float("inf") and torch.isnan(out[2, torch.arange(64, device=device) != 7]).all()
    assert out[3, 9] == float("inf"), "bitsandbytes turns -inf into +inf (NaN takes the top code)"
    clean = lora_ext.quantize_nf4(w[4:].contiguous(), blocksize=64, double_quant=False).dequantize()
    assert torch.equal(out[4:], clean.float()), "other blocks must be unaffected"
    packed, state = _bnb_quantize(w.cpu(), 64, False)
    assert torch.equal(qw.data.cpu(), packed)
    torch.testing.assert_close(qw.absmax.cpu(), state.absmax, rtol=0, atol=0, equal_nan=True)


@requires_bnb
def test_all_zero_tensor_double_quant():
    w = torch.zeros(3, 100)
    qw = lora_ext.quantize_nf4(w, blocksize=32, double_quant=True)
    out = qw.dequantize()
    assert torch.equal(out, w) and not torch.isnan(out).any()
    packed, state = _bnb_quantize(w, 32, True)
    _assert_same_as_bnb(qw, packed, state)


def test_empty_tensor(device):
    for double_quant in (False, True):
        w = torch.empty(0, 17, device=device)
        qw = lora_ext.quantize_nf4(w, blocksize=64, double_quant=double_quant)
        assert qw.data.shape == (0, 1) and qw.absmax.numel() == 0
        assert qw.dequantize().shape == (0, 17)


@requires_bnb
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_views_same_bytes(storage):
    w = _data((64, 96), torch.bfloat16)
    qw = lora_ext.quantize_nf4(w, blocksize=64, double_quant=True, quant_storage=storage)
    assert qw.data.dtype == storage and qw.quant_storage == storage
    packed, state = _bnb_quantize(w, 64, True, quant_storage=storage)
    assert qw.data.shape == packed.shape
    # Compare bytes: viewed as floats, some byte patterns are NaN.
    assert torch.equal(qw.data.view(torch.uint8), packed.view(torch.uint8))
    assert torch.equal(qw.dequantize(), dequantize_by_definition(packed, state))
    plain = lora_ext.quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(qw.packed, plain.data)


def test_quant_storage_odd_bytes_is_refused():
    qw = lora_ext.quantize_nf4(torch.randn(3, 7), blocksize=64)  # 11 packed bytes
    with pytest.raises(ValueError, match="11 packed bytes cannot be viewed as torch.float32"):
        qw.with_storage(torch.float32)


def test_nf4weight_container(device):
    w = _data((40, 70), torch.float16, device)
    qw = lora_ext.quantize_nf4(w, blocksize=64, double_quant=True)
    n = w.numel()
    nblocks = math.ceil(n / 64)
    assert qw.nbytes == (n + 1) // 2 + nblocks + 4 * math.ceil(nblocks / 256) + 256 * 4 + 4
    moved = qw.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.dequantize(), qw.dequantize().cpu())
    assert lora_ext.dequantize_nf4(qw).dtype == torch.float16
    assert lora_ext.dequantize_nf4(qw, torch.float32).dtype == torch.float32


# ---------------------------------------------------------------- bad input


def test_rejects_non_floating_input():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 tensor, got torch.int32"):
        lora_ext.quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="got torch.float64"):
        lora_ext.quantize_nf4(torch.ones(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 0, -64])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"power of two in \[32, 4096\]"):
        lora_ext.quantize_nf4(torch.randn(4, 64), blocksize=blocksize)


def test_op_level_checks_name_the_expectation():
    w = torch.randn(8, 64)
    packed, absmax = torch.ops.lora_ext.quantize_nf4(w, 64)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        torch.ops.lora_ext.quantize_nf4(w, 96)
    with pytest.raises(RuntimeError, match="absmax .one per block. must have 8 elements, got 7"):
        torch.ops.lora_ext.dequantize_nf4(packed, absmax[:7], 64, [8, 64], torch.float32)
    with pytest.raises(RuntimeError, match="packed weight .* must have 256 elements"):
        torch.ops.lora_ext.dequantize_nf4(packed[:-1], absmax, 64, [8, 64], torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        torch.ops.lora_ext.dequantize_nf4(packed, absmax, 64, [8, 64], torch.float64)
    with pytest.raises(RuntimeError, match="absmax must be Float"):
        torch.ops.lora_ext.dequantize_nf4(packed, absmax.half(), 64, [8, 64], torch.float32)
    with pytest.raises(RuntimeError, match="must be given together"):
        torch.ops.lora_ext.dequantize_nf4(packed, absmax, 64, [8, 64], torch.float32, nested_absmax=absmax)


def test_dequantize_out_fills_a_workspace(device):
    qw = lora_ext.quantize_nf4(_data((70, 130), torch.bfloat16, device), 64, True)
    for dtype in DTYPES:
        out = torch.full((70, 130), float("nan"), dtype=dtype, device=device)
        lora_ext.ops.dequantize_nf4_out(qw.packed, qw.absmax, 64, out, qw.nested_absmax, qw.nested_code, qw.offset)
        assert torch.equal(out, qw.dequantize(dtype))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        lora_ext.ops.dequantize_nf4_out(qw.packed, qw.absmax, 64, torch.empty(130, 70, device=device).t(),
                                        qw.nested_absmax, qw.nested_code, qw.offset)
    with pytest.raises(RuntimeError, match="packed weight of a shape with this many elements must have"):
        lora_ext.ops.dequantize_nf4_out(qw.packed, qw.absmax, 64, torch.empty(70, 131, device=device),
                                        qw.nested_absmax, qw.nested_code, qw.offset)


def test_dequantize_rejects_wrong_dtype():
    qw = lora_ext.quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16, got torch.int8"):
        lora_ext.dequantize_nf4(qw, torch.int8)


# ---------------------------------------------------------------- opcheck / compile


def _op_samples(device):
    w = _data((33, 65), torch.bfloat16, device)
    packed, absmax = torch.ops.lora_ext.quantize_nf4(w, 64)
    code = R.dynamic_map().to(device)
    q, nested, offset = torch.ops.lora_ext.double_quant(absmax, code, 256)
    return [
        (torch.ops.lora_ext.quantize_nf4.default, (w, 64), {}),
        (torch.ops.lora_ext.quantize_nf4.default, (w.float()[:, :7], 32), {}),
        (torch.ops.lora_ext.double_quant.default, (absmax, code, 256), {}),
        (torch.ops.lora_ext.dequantize_nf4.default, (packed, absmax, 64, [33, 65], torch.float16), {}),
        (torch.ops.lora_ext.dequantize_nf4.default, (packed, q, 64, [33, 65], torch.float32),
         {"nested_absmax": nested, "nested_code": code, "offset": offset, "nested_blocksize": 256}),
        (torch.ops.lora_ext.dequantize_nf4_out.default,
         (packed, absmax, 64, torch.empty(33, 65, dtype=torch.bfloat16, device=device)), {}),
        (torch.ops.lora_ext.dequantize_nf4_out.default, (packed, q, 64, torch.empty(33, 65, device=device)),
         {"nested_absmax": nested, "nested_code": code, "offset": offset}),
    ]


def test_opcheck(device):
    for op, args, kwargs in _op_samples(device):
        torch.library.opcheck(op, args, kwargs)


def test_torch_compile_dequantize(device):
    qw = lora_ext.quantize_nf4(_data((64, 128), torch.float16, device), blocksize=64, double_quant=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, packed, absmax, nested, code, offset):
        w = torch.ops.lora_ext.dequantize_nf4(packed, absmax, 64, [64, 128], torch.float16, nested, code, offset)
        return x @ w.t()

    x = torch.randn(3, 128, dtype=torch.float16, device=device)
    out = f(x, qw.data, qw.absmax, qw.nested_absmax, qw.nested_code, qw.offset)
    assert torch.equal(out, x @ qw.dequantize().t())


# ---------------------------------------------------------------- CUDA against the CPU


@requires_cuda
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype, double_quant):
    for shape, blocksize in [((1, 1), 64), ((3, 5), 32), ((4097, 1024), 64), ((11, 4096 * 3 + 7), 4096), ((1000,), 256)]:
        w = _data(shape, dtype)
        w.view(-1)[::97] = 0
        cpu = lora_ext.quantize_nf4(w, blocksize, double_quant)
        gpu = lora_ext.quantize_nf4(w.cuda(), blocksize, double_quant)
        assert torch.equal(gpu.data.cpu(), cpu.data)
        if double_quant:
            # The offset is torch's mean, as bitsandbytes takes it on each device; CPU and CUDA sum
            # in different orders, so it may differ by an ulp. Given the same offset, the nested
            # state must be bit-identical.
            raw = torch.ops.lora_ext.quantize_nf4(w, blocksize)[1]
            off = gpu.offset.cpu()
            assert torch.isclose(off, cpu.offset, rtol=1e-6, atol=0)
            q, nested = R.quantize_blockwise_8bit(raw - off, R.dynamic_map(), 256)
            assert torch.equal(gpu.absmax.cpu(), q) and torch.equal(gpu.nested_absmax.cpu(), nested)
        else:
            assert torch.equal(gpu.absmax.cpu(), cpu.absmax)
        for out_dtype in DTYPES:
            # Decode the CPU's bytes on the GPU, so only the dequant kernel is compared.
            assert torch.equal(cpu.to("cuda").dequantize(out_dtype).cpu(), cpu.dequantize(out_dtype))


@requires_cuda
def test_cuda_unaligned_packed_view():
    w = _data((64, 256), torch.bfloat16)
    qw = lora_ext.quantize_nf4(w, 64, double_quant=False).to("cuda")
    # A packed view starting 1 byte in: the kernel must take its element-wise path.
    raw = torch.empty(qw.data.numel() + 1, dtype=torch.uint8, device="cuda")
    raw[1:].copy_(qw.data.view(-1))
    view = raw[1:].view(-1, 1)
    assert view.data_ptr() % 16 != 0
    out = torch.ops.lora_ext.dequantize_nf4(view, qw.absmax, 64, [64, 256], torch.bfloat16)
    assert torch.equal(out, qw.dequantize())


@requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a GPU with 40 GB")
def test_cuda_more_than_2_to_the_31_elements():
    n = 2**31 + 4096 * 3 + 64
    w = torch.randn(n // 64, 64, device="cuda", dtype=torch.bfloat16)
    qw = lora_ext.quantize_nf4(w, 64, double_quant=True)
    del w
    tail_blocks = 8
    out = qw.dequantize()
    # Check the last blocks (past 2^31) against the reference on just those bytes.
    start = n - tail_blocks * 64
    ref = R.dequantize_nf4(qw.data[start // 2:], R.decode_absmax(qw.absmax, qw.nested_absmax, qw.nested_code,
                                                                 qw.offset)[start // 64:],
                           64, (tail_blocks * 64,), torch.bfloat16)
    assert torch.equal(out.view(-1)[start:].cpu(), ref.cpu())


@requires_bnb
@requires_cuda
def test_cuda_matches_bitsandbytes_cuda():
    if not getattr(bnb, "__version__", None):
        pytest.skip("bitsandbytes without version")
    w = _data((1024, 4096), torch.bfloat16, "cuda")
    try:
        packed, state = _bnb_quantize(w, 64, True)
    except Exception as e:  # bitsandbytes built without CUDA here
        pytest.skip(f"bitsandbytes CUDA backend unavailable: {e}")
    qw = lora_ext.quantize_nf4(w, 64, True)
    # bitsandbytes' CUDA quantizer takes a reciprocal where its CPU path divides (trailing block),
    # and its CPU 8-bit map differs at grid ties; full blocks of the 4-bit codes agree exactly.
    assert torch.equal(qw.data, packed)
    out = qw.dequantize()
    ref = BF.dequantize_4bit(packed, state)
    assert (out.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item()


def test_portable_cpu_path_matches_simd_path(tmp_path):
    """The x86 SIMD dequantizer and the portable loop (LORA_EXT_DISABLE_SIMD=1) give the same bits."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch, lora_ext\n"
        "torch.manual_seed(7)\n"
        "w = torch.randn(37, 4096 + 96) * 3\n"
        "outs = {}\n"
        "for bs in (32, 64, 4096):\n"
        "    for dq in (False, True):\n"
        "        qw = lora_ext.quantize_nf4(w, bs, dq)\n"
        "        for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "            outs[f'{bs}-{dq}-{dt}'] = qw.dequantize(dt)\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for flag in ("0", "1"):
        path = tmp_path / f"out{flag}.pt"
        env = dict(os.environ, LORA_EXT_DISABLE_SIMD=flag, PYTHONPATH=root)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=root, timeout=300)
        results[flag] = torch.load(path)
    for key, simd in results["0"].items():
        assert torch.equal(simd, results["1"][key]), key
