"""The two ceilings, measured once per run on the device under test: copy bandwidth (bytes read +
written) and the dense matmul rate (in the rows' activation dtype; on a CPU with native bf16 the fp32 rate
too, reported beside it), each from its best run (a ceiling is what the device can do; STREAM reports its
best time too). Every row is reported against the roofline they draw: the least time its bytes and FLOPs
allow, over the (median) time it took. The ceilings are measured out of cache, so work that stays in cache
can pass 1.0 a little."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..nf4 import dtype_name
from . import machine
from .timing import measure as measure_time

# (copy buffer bytes, square matmul size): large enough to leave the caches and to saturate the BLAS.
SIZES = {"cuda": (1 << 30, 8192), "cpu": (256 << 20, 2048), "tiny": (4 << 20, 256)}


@dataclass
class Ceilings:
    copy_Bps: float
    matmul_flops: float
    matmul_dtype: str
    matmul_n: int
    # fp32 matmul FLOP/s where the rows' dtype is another (a CPU with native bf16): the rate the LoRA branch's fp32
    # products and fp32 work are held to (README), reported, not part of the roofline of `of`.
    fp32_matmul_flops: Optional[float] = None

    def of(self, seconds: float, nbytes: float = 0, flops: float = 0) -> dict:
        """Which ceiling binds this work, and the fraction of it reached (1.0 = at the roofline)."""
        t_copy, t_mm = nbytes / self.copy_Bps, flops / self.matmul_flops
        return {"bound": "copy" if t_copy >= t_mm else "matmul", "fraction_of_ceiling": max(t_copy, t_mm) / seconds}

    def as_dict(self) -> dict:
        out = {"copy_bandwidth_GBps": self.copy_Bps / 1e9, "matmul_TFLOPs": self.matmul_flops / 1e12,
               "matmul_dtype": self.matmul_dtype, "matmul_n": self.matmul_n}
        if self.fp32_matmul_flops is not None:
            out["fp32_matmul_TFLOPs"] = self.fp32_matmul_flops / 1e12
        return out

    def describe(self) -> str:
        n = self.matmul_n
        fp32 = "" if self.fp32_matmul_flops is None else f", float32 matmul {self.fp32_matmul_flops / 1e12:.3g} TFLOP/s"
        return (f"copy bandwidth {self.copy_Bps / 1e9:.1f} GB/s (read + write), {self.matmul_dtype} matmul "
                f"{self.matmul_flops / 1e12:.3g} TFLOP/s ({n}x{n}x{n}){fp32}")


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = measure_time(lambda: dst.copy_(src), [()], device, warmup=2, min_reps=10, min_time_s=0.2)
    return 2 * nbytes / t.min_s


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n torch.mm (cuBLAS on a GPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure_time(lambda: a @ b, [()], device, warmup=2, min_reps=5, min_time_s=0.2)
    return 2 * n**3 / t.min_s


def measure(device: torch.device, scale: str) -> Ceilings:
    nbytes, n = SIZES["tiny" if scale == "tiny" else device.type]
    dtype = machine.activation_dtype(device)
    fp32 = matmul_rate(device, torch.float32, n) if device.type == "cpu" and dtype != torch.float32 else None
    return Ceilings(copy_bandwidth(device, nbytes), matmul_rate(device, dtype, n), dtype_name(dtype), n, fp32)
