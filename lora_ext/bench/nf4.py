"""NF4 kernels: dequantize throughput (bytes read + written) and quantize time, against bitsandbytes,
torchao's NF4Tensor and the pure-PyTorch reference, and against the copy bandwidth of the same run."""
from __future__ import annotations

import torch

from .. import reference as R
from ..nf4 import quantize_nf4, dequantize_nf4
from ..ops import dequantize_nf4_out
from .timing import copy_bandwidth, measure, rotation

SHAPES_QUICK = [(4096, 4096), (14336, 4096)]
SHAPES_FULL = SHAPES_QUICK + [(28672, 8192)]


def _peers(notes: list):
    peers = {}
    try:
        import bitsandbytes.functional as BF

        peers["bitsandbytes"] = BF
    except Exception as e:  # noqa: BLE001  (any import failure means: not available here)
        notes.append(f"bitsandbytes skipped: {type(e).__name__}: {e}")
    try:
        from torchao.dtypes.nf4tensor import to_nf4

        peers["torchao"] = to_nf4
    except Exception as e:  # noqa: BLE001
        notes.append(f"torchao skipped: {type(e).__name__}: {e}")
    return peers


def dequant_bytes(n: int, out_dtype: torch.dtype, double_quant: bool = True) -> int:
    nblocks = -(-n // 64)
    absmax = nblocks * (1 if double_quant else 4)
    return (n + 1) // 2 + absmax + n * torch.empty((), dtype=out_dtype).element_size()


def run(device: str = "cpu", quick: bool = True, dtype: torch.dtype = torch.bfloat16) -> dict:
    device = torch.device(device)
    notes: list = []
    peers = _peers(notes)
    copy_bw = copy_bandwidth(device)
    rows = []
    shapes = SHAPES_QUICK if quick else SHAPES_FULL
    if quick and device.type == "cpu":
        shapes = shapes[:1]
    for shape in shapes:
        n = shape[0] * shape[1]
        nbytes = dequant_bytes(n, dtype)

        def weight():
            return torch.randn(shape, device=device, dtype=dtype)

        ours = rotation(lambda: (quantize_nf4(weight(), 64, True),), nbytes, device)
        cases = {
            "lora_ext": (lambda qw: dequantize_nf4(qw, dtype), ours),
            "lora_ext (into workspace)": (
                lambda qw, out: dequantize_nf4_out(qw.packed, qw.absmax, 64, out, qw.nested_absmax, qw.nested_code,
                                                   qw.offset),
                [(a[0], torch.empty(shape, device=device, dtype=dtype)) for a in ours]),
        }
        if "bitsandbytes" in peers:
            BF = peers["bitsandbytes"]
            sets = [BF.quantize_4bit(a[0].dequantize(), blocksize=64, compress_statistics=True, quant_type="nf4")
                    for a in ours]
            cases["bitsandbytes"] = (lambda q, s: BF.dequantize_4bit(q, s), sets)
        if "torchao" in peers:
            sets = [(peers["torchao"](a[0].dequantize(), 64, 256),) for a in ours]
            cases["torchao NF4Tensor"] = (lambda t: t.get_original_weight(), sets)
        if not quick or device.type == "cuda":
            cases["reference (pure PyTorch)"] = (
                lambda qw: R.dequantize_nf4(qw.packed, qw.absmax, 64, qw.shape, dtype, qw.nested_absmax,
                                            qw.nested_code, qw.offset), ours[:1])
        results = {}
        for peer, (fn, sets) in cases.items():
            t = measure(fn, sets, device, min_time_s=0.2 if quick else 0.5)
            results[peer] = t.median_s
        base = results.get("bitsandbytes")
        for peer, s in results.items():
            rows.append({"kernel": "nf4_dequantize", "shape": list(shape), "dtype": str(dtype).split(".")[-1],
                         "double_quant": True, "blocksize": 64, "peer": peer, "ms": s * 1e3,
                         "GB/s": nbytes / s / 1e9, "fraction_of_copy_bw": nbytes / s / copy_bw,
                         "speedup_vs_bitsandbytes": (base / s) if base else None})
    # Quantize: one-off cost at load time, reported as time.
    shape = SHAPES_QUICK[0]
    w = torch.randn(shape, device=device, dtype=dtype)
    q_cases = {"lora_ext": lambda: quantize_nf4(w, 64, True)}
    if "bitsandbytes" in peers:
        BF = peers["bitsandbytes"]
        q_cases["bitsandbytes"] = lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    if "torchao" in peers:
        q_cases["torchao NF4Tensor"] = lambda: peers["torchao"](w, 64, 256)
    q_times = {peer: measure(fn, [()], device, warmup=1, min_reps=3, min_time_s=0.1).median_s
               for peer, fn in q_cases.items()}
    for peer, s in q_times.items():
        base = q_times.get("bitsandbytes")
        rows.append({"kernel": "nf4_quantize", "shape": list(shape), "dtype": str(dtype).split(".")[-1],
                     "double_quant": True, "blocksize": 64, "peer": peer, "ms": s * 1e3,
                     "speedup_vs_bitsandbytes": (base / s) if base else None})
    return {"device": str(device), "copy_bandwidth_GBps": copy_bw / 1e9, "rows": rows, "notes": notes}
