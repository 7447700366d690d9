"""A short GPU run of every CUDA kernel on odd shapes, checked against the CPU kernels; sized for
compute-sanitizer (bench/gpu_check.sh runs it under memcheck)."""
import sys

import torch

import lora_ext
from lora_ext import reference as R
from lora_ext.ops import dequantize_nf4_out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """a (any device, dtype) equals b within tol relative to b's largest magnitude."""
    a, b = a.double().cpu(), b.double().cpu()
    return torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max().item())


def nf4_state_matches(w: torch.Tensor, cpu, gpu) -> bool:
    """The GPU's quantization of w (an NF4Weight on any device) against the CPU's: packed bytes and plain
    absmax bit for bit. The double-quant offset is torch's mean of absmax, which each device sums in its
    own order (an ulp apart at most), so the nested state is held to the CPU's bits given the GPU's offset."""
    ok = torch.equal(gpu.data.cpu(), cpu.data)
    if not cpu.double_quant:
        return ok and torch.equal(gpu.absmax.cpu(), cpu.absmax)
    raw = torch.ops.lora_ext.quantize_nf4(w.cpu(), cpu.blocksize)[1]
    q, nested = R.quantize_blockwise_8bit(raw - gpu.offset.cpu(), R.dynamic_map(), 256)
    ok = ok and torch.equal(gpu.absmax.cpu(), q) and torch.equal(gpu.nested_absmax.cpu(), nested)
    return ok and torch.isclose(gpu.offset.cpu(), cpu.offset, rtol=1e-6, atol=0).item()


def nf4_decodes_alike(cpu, device: str) -> bool:
    """The CPU's NF4 state decoded on `device` (both dequant entry points) equals the CPU's decoding:
    only the dequant kernels are compared."""
    there = cpu.to(device)
    out = torch.empty(cpu.shape, dtype=torch.float32, device=device)
    dequantize_nf4_out(there.packed, there.absmax, cpu.blocksize, out, there.nested_absmax, there.nested_code,
                       there.offset)
    return torch.equal(there.dequantize().cpu(), cpu.dequantize()) and \
        torch.equal(out.cpu(), cpu.dequantize(torch.float32))


def main() -> int:
    assert torch.cuda.is_available(), "gpu_smoke needs a CUDA device"
    torch.manual_seed(0)
    failures = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, bs in [((1, 1), 64), ((3, 5), 32), ((7, 33), 64), ((129, 257), 4096), ((2, 4096 + 31), 128)]:
            for dq in (False, True):
                w = torch.randn(shape, dtype=dtype)
                cpu = lora_ext.quantize_nf4(w, bs, dq)
                gpu = lora_ext.quantize_nf4(w.cuda(), bs, dq)
                ok = nf4_state_matches(w, cpu, gpu) and nf4_decodes_alike(cpu, "cuda")
                if not ok:
                    failures.append((dtype, shape, bs, dq))
    # nf4_linear: fused GEMV (vector and scalar paths, tiles of 1 and 4 rows) and workspace path.
    for dtype in (torch.float32, torch.bfloat16):
        for M, K, N in [(1, 4096, 40), (3, 4096, 7), (16, 96, 33), (5, 4097, 9), (300, 128, 20)]:
            w = torch.randn(N, K, dtype=dtype) * 0.05
            qw = lora_ext.quantize_nf4(w, 64, True)
            x = torch.randn(M, K, dtype=dtype)
            bias = torch.randn(N, dtype=dtype)
            ref = lora_ext.nf4_linear(x.double(), qw, bias.double())
            for max_m in (-1, 1 << 20, 0):
                y = lora_ext.ops.nf4_linear(x.cuda(), qw.packed.cuda(), qw.absmax.cuda(), N, 64, bias.cuda(),
                                            qw.nested_absmax.cuda(), qw.nested_code.cuda(), qw.offset.cuda(), 256,
                                            max_m)
                if not _close(y, ref, 1e-4 if dtype == torch.float32 else 3e-2):
                    failures.append(("nf4_linear", dtype, M, K, N, max_m))
    # LoRA: Philox dropout (same bits as the CPU), forward and backward.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(37, 129, dtype=dtype)
        if not torch.equal(lora_ext.ops.lora_dropout(x.cuda(), 0.3, 11).cpu(), R.lora_dropout(x, 0.3, 11)):
            failures.append(("lora_dropout", dtype))
    x, base = torch.randn(2, 9, 64, dtype=torch.bfloat16), torch.randn(2, 9, 48, dtype=torch.bfloat16)
    A, B = torch.randn(12, 64) / 8, torch.randn(48, 12) / 4
    y, T = torch.ops.lora_ext.lora_forward(x.cuda(), base.cuda(), A.cuda(), B.cuda(), 2.0, 0.2, 5)
    y_ref, T_ref = R.lora_forward(x, base, A, B, 2.0, 0.2, 5)
    if not _close(y, y_ref, 2e-2):
        failures.append("lora_forward")
    g = torch.ops.lora_ext.lora_backward(torch.ones_like(y), x.cuda(), T, A.cuda(), B.cuda(), 2.0, 0.2, 5)
    g_ref = R.lora_backward(torch.ones_like(y_ref), x, T_ref, A, B, 2.0, 0.2, 5)
    for a, b in zip(g, g_ref):
        if not _close(a, b, 2e-2):
            failures.append("lora_backward")
    # The low-rank kernels against the CPU operator: split-K over >= 1024 tokens, r > 64 (two column
    # tiles), K % 4 != 0 (dropout drawn per element), an unaligned x (no vector loads), r = 1. On an
    # sm_80+ GPU the tensor-core kernel takes bf16 and fp32 activations' products, and every y and dx.
    for M, K, N, r, p, dtype, offset in [(1100, 36, 20, 12, 0.3, torch.bfloat16, 0),
                                         (1030, 33, 70, 80, 0.2, torch.float16, 0),
                                         (67, 40, 17, 16, 0.1, torch.bfloat16, 1), (5, 7, 3, 1, 0.0, torch.float32, 0),
                                         (300, 40, 90, 48, 0.2, torch.float32, 0)]:
        x = torch.randn(M * K + offset, dtype=dtype)[offset:].view(M, K)
        base, dy = torch.randn(M, N, dtype=dtype), torch.randn(M, N, dtype=dtype)
        A, B = torch.randn(r, K) / K ** 0.5, torch.randn(N, r) / r ** 0.5
        base_dx = torch.randn(M, K, dtype=dtype) if offset == 0 else None  # the layer op's dx addend
        y, T = torch.ops.lora_ext.lora_forward(x, base, A, B, 0.5, p, 3)
        grads = torch.ops.lora_ext.lora_backward(dy, x, T, A, B, 0.5, p, 3, base_dx)
        xg = torch.empty(M * K + offset, dtype=dtype, device="cuda")[offset:].view(M, K).copy_(x)
        y_g, T_g = torch.ops.lora_ext.lora_forward(xg, base.cuda(), A.cuda(), B.cuda(), 0.5, p, 3)
        grads_g = torch.ops.lora_ext.lora_backward(dy.cuda(), xg, T_g, A.cuda(), B.cuda(), 0.5, p, 3,
                                                   None if base_dx is None else base_dx.cuda())
        for name, a, b in [("y", y_g, y), ("T", T_g, T)] + list(zip(("dx", "dA", "dB"), grads_g, grads)):
            if not _close(a, b, 1e-5 if a.dtype == torch.float32 else 1e-2) or a.stride() != b.stride():
                failures.append(("lora kernels", name, M, K, N, r, p))
    # The layer as one operator over a dense and an NF4 base, forward and backward, against the CPU.
    for kind in ("dense", "nf4"):
        lin = torch.nn.Linear(200, 72).to(torch.bfloat16)
        base = lora_ext.NF4Linear.from_linear(lin) if kind == "nf4" else lin
        layer = lora_ext.LoraLinear(base, r=16, lora_alpha=32, lora_dropout=0.1, init_lora_weights=False)
        x = torch.randn(3, 50, 200, dtype=torch.bfloat16)
        outs = []
        for dev in ("cpu", "cuda"):
            layer.to(dev)
            xd = x.to(dev).requires_grad_(True)
            torch.manual_seed(9)
            y = layer(xd)
            y.backward(torch.ones_like(y))
            outs.append((y, xd.grad, layer.lora_A.grad, layer.lora_B.grad))
            layer.zero_grad()
        for name, a, b in zip(("y", "dx", "dA", "dB"), outs[1], outs[0]):
            if not _close(a, b, 1e-4 if a.dtype == torch.float32 else 3e-2):
                failures.append(("layer op", kind, name))
    # DoRA: g and the bias in y's epilogue, the backward on g * B and the column dots, against the CPU
    # operator (g with zeros; split rows for the column dots; bf16 and fp32 on the tensor-core path).
    for M, K, N, r, dtype in [(1030, 72, 70, 16, torch.bfloat16), (37, 40, 23, 5, torch.float32),
                              (300, 33, 90, 80, torch.float16)]:
        x, base, dy = torch.randn(M, K).to(dtype), torch.randn(M, N).to(dtype), torch.randn(M, N).to(dtype)
        A, B = torch.randn(r, K) / K ** 0.5, torch.randn(N, r) / r ** 0.5
        g, bias, dx_base = torch.rand(N) + 0.5, torch.randn(N).to(dtype), torch.randn(M, K).to(dtype)
        g[::5] = 0
        cpu_args = (x, base, A, B, g)
        y, T = torch.ops.lora_ext.dora_forward(*cpu_args, bias, 0.7)
        grads = torch.ops.lora_ext.dora_backward(dy, x, base, T, A, B, g, 0.7, dx_base)
        gpu_args = tuple(t.cuda() for t in cpu_args)
        y_g, T_g = torch.ops.lora_ext.dora_forward(*gpu_args, bias.cuda(), 0.7)
        grads_g = torch.ops.lora_ext.dora_backward(dy.cuda(), x.cuda(), base.cuda(), T_g, A.cuda(), B.cuda(),
                                                   g.cuda(), 0.7, dx_base.cuda())
        for name, a, b in [("y", y_g, y), ("T", T_g, T)] + list(zip(("dx", "dA", "dB", "dg"), grads_g, grads)):
            if not _close(a, b, 1e-5 if a.dtype == torch.float32 and name != "y" else 1e-2):
                failures.append(("dora kernels", name, M, K, N, r, dtype))
    # Merge: fp64 delta, one rounding; the CUDA bits equal the CPU's.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        W = torch.randn(37, 301).to(dtype)
        A, B = torch.randn(12, 301) / 17, torch.randn(37, 12) / 3
        cpu, gpu = W.clone(), W.cuda()
        lora_ext.merge_lora_(cpu, A, B, 0.5)
        lora_ext.merge_lora_(gpu, A.cuda(), B.cuda(), 0.5)
        if not torch.equal(gpu.cpu(), cpu):
            failures.append(("merge_lora_", dtype))
    # Mixed-adapter batch: decode-like one-row tiles and prefill-like runs past 64 rows, ragged ranks, an
    # adapter absent (r = 0), K in slices; against the CPU operator.
    from lora_ext import multi_lora
    ranks = [5, 0, 20, 16]
    As = [torch.randn(r, 600) / 25 for r in ranks]
    Bs = [torch.randn(70, r) for r in ranks]
    for idx in (torch.tensor([3, 0, -1, 2, 2, 0, 3]), torch.arange(4).repeat_interleave(70)):
        for dtype in (torch.float32, torch.bfloat16):
            x, y0 = torch.randn(idx.numel(), 600).to(dtype), torch.randn(idx.numel(), 70).to(dtype)
            cpu = multi_lora.add_adapters_(y0.clone(), x, As, Bs, [0.5, 1, 2, 3], multi_lora.plan(idx, 4))
            gpu = multi_lora.add_adapters_(y0.cuda(), x.cuda(), [a.cuda() for a in As], [b.cuda() for b in Bs],
                                           [0.5, 1, 2, 3], multi_lora.plan(idx, 4, "cuda"))
            if not _close(gpu, cpu, 1e-5 if dtype == torch.float32 else 1e-2):
                failures.append(("multi_lora_forward_", idx.numel(), dtype))
    # An unaligned packed view takes the element-wise path.
    qw = lora_ext.quantize_nf4(torch.randn(64, 256, device="cuda"), 64, False)
    raw = torch.empty(qw.data.numel() + 1, dtype=torch.uint8, device="cuda")
    raw[1:].copy_(qw.data.view(-1))
    out = torch.ops.lora_ext.dequantize_nf4(raw[1:].view(-1, 1), qw.absmax, 64, [64, 256], torch.bfloat16)
    if not torch.equal(out, qw.dequantize(torch.bfloat16)):
        failures.append("unaligned view")
    torch.cuda.synchronize()
    print("gpu_smoke:", "OK" if not failures else f"FAILED {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
