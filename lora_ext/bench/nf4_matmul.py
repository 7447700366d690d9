"""NF4 linear across M on Llama shapes: ours (auto, fused GEMV forced, workspace+BLAS forced) against
bitsandbytes' matmul_4bit, dequantize + torch.matmul, and dense bf16 matmul; the fused path also as
a fraction of the copy bandwidth on the bytes it must read (packed weight + absmax + x + y)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nf4 import dequantize_nf4, quantize_nf4
from ..ops import nf4_linear as nf4_linear_op
from .timing import copy_bandwidth, measure, rotation

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]  # (out_features N, in_features K)
MS = [1, 2, 4, 8, 16, 32, 64, 256, 4096]


def _op(x, qw, max_m):
    return nf4_linear_op(x, qw.packed, qw.absmax, qw.shape[0], qw.blocksize, None, qw.nested_absmax, qw.nested_code,
                         qw.offset, qw.nested_blocksize, max_m)


def run(device: str = "cpu", quick: bool = True, dtype: torch.dtype = torch.bfloat16) -> dict:
    device = torch.device(device)
    notes = []
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF
    except Exception as e:  # noqa: BLE001
        bnb = None
        notes.append(f"bitsandbytes skipped: {type(e).__name__}: {e}")
    copy_bw = copy_bandwidth(device)
    shapes, ms = SHAPES, MS
    if device.type == "cpu":
        shapes, ms = SHAPES[:1], ([1, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 256])
    elif quick:
        ms = [1, 4, 16, 64, 256, 4096]
    rows = []
    for N, K in shapes:
        wbytes = N * K // 2 + N * K // 64
        dense = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        sets = rotation(lambda: (quantize_nf4(dense, 64, True),), wbytes, device)
        bnb_sets = None
        if bnb is not None:
            bnb_sets = [BF.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
                        for _ in sets]
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            cases = {
                "lora_ext": (lambda qw: _op(x, qw, -1), sets),
                "lora_ext fused GEMV": (lambda qw: _op(x, qw, 1 << 30), sets),
                "lora_ext workspace+BLAS": (lambda qw: _op(x, qw, 0), sets),
                "dequantize + torch.matmul": (lambda qw: F.linear(x, dequantize_nf4(qw, dtype)), sets),
                f"dense {str(dtype).split('.')[-1]} torch.matmul": (lambda: F.linear(x, dense), [()]),
            }
            if device.type == "cpu" and M > 16:
                del cases["lora_ext fused GEMV"]
            if bnb_sets is not None:
                cases["bitsandbytes matmul_4bit"] = (lambda q, s: bnb.matmul_4bit(x, q.t(), quant_state=s), bnb_sets)
            times = {}
            for peer, (fn, args) in cases.items():
                times[peer] = measure(fn, args, device, warmup=2, min_reps=5, min_time_s=0.1).median_s
            moved = wbytes + (M * K + M * N) * x.element_size()
            base = times.get("bitsandbytes matmul_4bit")
            for peer, s in times.items():
                row = {"kernel": "nf4_linear", "N": N, "K": K, "M": M, "peer": peer, "ms": s * 1e3,
                       "TFLOP/s": 2 * M * N * K / s / 1e12,
                       "speedup_vs_bitsandbytes": (base / s) if base else None}
                if peer.startswith("lora_ext"):
                    row["fraction_of_copy_bw"] = moved / s / copy_bw
                rows.append(row)
    return {"device": str(device), "copy_bandwidth_GBps": copy_bw / 1e9, "rows": rows, "notes": notes}
