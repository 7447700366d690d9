"""The two ceilings, measured once per run on the device under test: copy bandwidth (bytes read +
written) and the dense matmul rate (bf16 on a GPU, fp32 on the CPU), each from its best run (a ceiling
is what the device can do; STREAM reports its best time too). Every row is reported against the
roofline they draw: the least time its bytes and FLOPs allow, over the (median) time it took. The
ceilings are measured out of cache, so work that stays in cache can pass 1.0 a little."""
from __future__ import annotations

from dataclasses import dataclass

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

    def of(self, seconds: float, nbytes: float = 0, flops: float = 0) -> dict:
        """Which ceiling binds this work, and the fraction of it reached (1.0 = at the roofline)."""
        t_copy, t_mm = nbytes / self.copy_Bps, flops / self.matmul_flops
        return {"bound": "copy" if t_copy >= t_mm else "matmul", "fraction_of_ceiling": max(t_copy, t_mm) / seconds}

    def as_dict(self) -> dict:
        return {"copy_bandwidth_GBps": self.copy_Bps / 1e9, "matmul_TFLOPs": self.matmul_flops / 1e12,
                "matmul_dtype": self.matmul_dtype, "matmul_n": self.matmul_n}

    def describe(self) -> str:
        n = self.matmul_n
        return (f"copy bandwidth {self.copy_Bps / 1e9:.1f} GB/s (read + write), {self.matmul_dtype} matmul "
                f"{self.matmul_flops / 1e12:.3g} TFLOP/s ({n}x{n}x{n})")


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
    return Ceilings(copy_bandwidth(device, nbytes), matmul_rate(device, dtype, n), dtype_name(dtype), n)
