"""NF4 linear across M on Llama shapes: ours (auto, fused GEMV forced, workspace+BLAS forced) against
bitsandbytes' matmul_4bit, torchao's NF4Tensor under F.linear, dequantize + torch.matmul, and the dense
bf16 matmul (cuBLAS on a GPU); each row against the roofline of its format's bytes (packed NF4, or the
dense weight) and its FLOPs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nf4 import dequantize_nf4, quantize_nf4
from ..ops import nf4_linear as nf4_linear_op
from . import peers
from .timing import EFFORT, rotation
from .work import nf4_bytes

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]  # (out_features N, in_features K)
MS = [1, 2, 4, 8, 16, 32, 64, 256, 4096]
CASES = {  # (shapes, Ms)
    ("cuda", "full"): (SHAPES, MS),
    ("cuda", "quick"): (SHAPES, [1, 4, 16, 64, 256, 4096]),
    ("cpu", "full"): (SHAPES[:1], [1, 2, 4, 8, 16, 32, 64, 256]),
    ("cpu", "quick"): (SHAPES[:1], [1, 16, 64]),
}
TINY = ([(128, 128)], [1, 8])  # torchao needs numel divisible by 64 x 256
CPU_GEMV_MAX_M = 16  # the forced fused kernel beyond this M on the CPU is slow and not what auto picks


def _op(x, qw, max_m):
    return nf4_linear_op(x, qw.packed, qw.absmax, qw.shape[0], qw.blocksize, None, qw.nested_absmax, qw.nested_code,
                         qw.offset, qw.nested_blocksize, max_m)


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes: list = []
    bnb, to_nf4 = peers.bitsandbytes(notes), peers.torchao_to_nf4(notes)
    dtype = torch.bfloat16
    dense_name = "dense bf16 cuBLAS" if device.type == "cuda" else "dense bf16 torch.matmul"
    shapes, ms = TINY if scale == "tiny" else CASES[device.type, scale]
    rows = []
    for N, K in shapes:
        dense = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        sets = rotation(lambda: (quantize_nf4(dense, 64, True),), nf4_bytes(N * K), device)
        peer_sets = {}  # a peer whose weights could not be made here is a note, not a crash
        if bnb is not None:
            peer_sets["bitsandbytes matmul_4bit"] = peers.attempt("bitsandbytes", lambda: [
                bnb.functional.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
                for _ in sets], notes)
        if to_nf4 is not None:
            nf4t = peers.attempt("torchao NF4Tensor", lambda: peers.copies(to_nf4(dense, 64, 256), len(sets)), notes)
            peer_sets["torchao NF4Tensor"] = nf4t and [(t,) for t in nf4t]
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            cases = {
                "lora_ext": (lambda qw: _op(x, qw, -1), sets),
                "lora_ext fused GEMV": (lambda qw: _op(x, qw, 1 << 30), sets),
                "lora_ext workspace+BLAS": (lambda qw: _op(x, qw, 0), sets),
                "dequantize + torch.matmul": (lambda qw: F.linear(x, dequantize_nf4(qw, dtype)), sets),
                dense_name: (lambda: F.linear(x, dense), [()]),
            }
            if device.type == "cpu" and M > CPU_GEMV_MAX_M:
                del cases["lora_ext fused GEMV"]
            if peer_sets.get("bitsandbytes matmul_4bit"):
                cases["bitsandbytes matmul_4bit"] = (lambda q, s: bnb.matmul_4bit(x, q.t(), quant_state=s),
                                                     peer_sets["bitsandbytes matmul_4bit"])
            if peer_sets.get("torchao NF4Tensor"):
                cases["torchao NF4Tensor"] = (lambda t: F.linear(x, t), peer_sets["torchao NF4Tensor"])
            times = {peer: s for peer, (fn, args) in cases.items()
                     if (s := peers.median_s(peer, fn, args, device, EFFORT[scale], notes))}
            act = (M * K + M * N) * dtype.itemsize
            base = times.get("bitsandbytes matmul_4bit")
            for peer, s in times.items():
                wbytes = N * K * dtype.itemsize if peer == dense_name else nf4_bytes(N * K)
                rows.append({"kernel": "nf4_linear", "N": N, "K": K, "M": M, "peer": peer, "ms": s * 1e3,
                             "TFLOP/s": 2 * M * N * K / s / 1e12, **ceilings.of(s, wbytes + act, 2 * M * N * K),
                             "speedup_vs_bitsandbytes": (base / s) if base else None})
    if device.type == "cpu":
        notes.append(f"the CPU matmul ceiling is {ceilings.matmul_dtype}; these rows run bf16")
    return {"rows": rows, "notes": notes}
