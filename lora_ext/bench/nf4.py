"""NF4 kernels: dequantize throughput (bytes read + written) and quantize time, against bitsandbytes,
torchao's NF4Tensor and the pure-PyTorch reference, and against the copy bandwidth of the same run."""
from __future__ import annotations

import torch

from .. import reference as R
from ..nf4 import dequantize_nf4, dtype_name, quantize_nf4
from ..ops import dequantize_nf4_out
from . import peers
from .timing import EFFORT, rotation
from .work import dequant_bytes, nf4_bytes

SHAPES = {"full": [(4096, 4096), (14336, 4096), (28672, 8192)], "quick": [(4096, 4096), (14336, 4096)],
          "tiny": [(128, 128)]}  # torchao needs blocks of 64 x 256
# Quantizing is a load-time cost of seconds for some peers on the CPU: a few runs.
QUANT_EFFORT = dict(warmup=1, min_reps=3, min_time_s=0.1)


def _dequant_cases(shape, dtype, device, bnb, to_nf4, notes) -> dict:
    ours = rotation(lambda: (quantize_nf4(torch.randn(shape, device=device, dtype=dtype), 64, True),),
                    dequant_bytes(shape[0] * shape[1], dtype), device)
    cases = {
        "lora_ext": (lambda qw: dequantize_nf4(qw, dtype), ours),
        "lora_ext (into workspace)": (
            lambda qw, out: dequantize_nf4_out(qw.packed, qw.absmax, 64, out, qw.nested_absmax, qw.nested_code,
                                               qw.offset),
            [(a[0], torch.empty(shape, device=device, dtype=dtype)) for a in ours]),
        # the reference dequantizes ~1 s per 4096^2 on 2 CPU cores: one weight suffices to time it
        "reference (pure PyTorch)": (lambda qw: R.dequantize_nf4(qw.packed, qw.absmax, 64, qw.shape, dtype,
                                                                  qw.nested_absmax, qw.nested_code, qw.offset),
                                     ours[:1]),
    }
    if bnb is not None:
        sets = peers.attempt("bitsandbytes", lambda: [bnb.functional.quantize_4bit(
            a[0].dequantize(), blocksize=64, compress_statistics=True, quant_type="nf4") for a in ours], notes)
        if sets:
            cases["bitsandbytes"] = (lambda q, s: bnb.functional.dequantize_4bit(q, s), sets)
    if to_nf4 is not None:
        sets = peers.attempt("torchao NF4Tensor", lambda: peers.copies(to_nf4(ours[0][0].dequantize(), 64, 256),
                                                                       len(ours)), notes)
        if sets:
            cases["torchao NF4Tensor"] = (lambda t: t.get_original_weight(), [(t,) for t in sets])
    return cases


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes: list = []
    bnb, to_nf4 = peers.bitsandbytes(notes), peers.torchao_to_nf4(notes)
    dtype = torch.bfloat16
    rows = []
    shapes = SHAPES[scale][:1] if (scale == "quick" and device.type == "cpu") else SHAPES[scale]
    effort = EFFORT[scale]
    for shape in shapes:
        n = shape[0] * shape[1]
        times = {}
        for peer, (fn, sets) in _dequant_cases(shape, dtype, device, bnb, to_nf4, notes).items():
            slow = peer.startswith("reference") and device.type == "cpu" and scale != "tiny"
            if s := peers.median_s(peer, fn, sets, device, QUANT_EFFORT if slow else effort, notes):
                times[peer] = s
        rows += _rows("nf4_dequantize", shape, dtype, times, dequant_bytes(n, dtype), ceilings)
    # Quantize: one-off cost at load time, on the first shape.
    shape = shapes[0]
    w = torch.randn(shape, device=device, dtype=dtype)
    q_cases = {"lora_ext": lambda: quantize_nf4(w, 64, True)}
    if bnb is not None:
        q_cases["bitsandbytes"] = lambda: bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                                      quant_type="nf4")
    if to_nf4 is not None:
        q_cases["torchao NF4Tensor"] = lambda: to_nf4(w, 64, 256)
    q_effort = effort if scale == "tiny" else QUANT_EFFORT
    times = {peer: s for peer, fn in q_cases.items() if (s := peers.median_s(peer, fn, [()], device, q_effort, notes))}
    n = shape[0] * shape[1]
    rows += _rows("nf4_quantize", shape, dtype, times, n * dtype.itemsize + nf4_bytes(n), ceilings)
    return {"rows": rows, "notes": notes}


def _rows(kernel, shape, dtype, times, nbytes, ceilings) -> list:
    base = times.get("bitsandbytes")
    return [{"kernel": kernel, "shape": list(shape), "dtype": dtype_name(dtype), "double_quant": True,
             "blocksize": 64, "peer": peer, "ms": s * 1e3, "GB/s": nbytes / s / 1e9, **ceilings.of(s, nbytes),
             "speedup_vs_bitsandbytes": base / s if base else None} for peer, s in times.items()]
