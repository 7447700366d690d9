"""Which CPU a run measured: the SIMD level torch dispatches to, the features that change which code is fast
(bf16 matmul with avx512_bf16 or AMX, our AVX2/FMA kernels), and the threads; kept in the results so a
reader can tell which machine a number came from."""
from __future__ import annotations

import platform

import torch

# The flags that decide a path here or in BLAS (Linux /proc/cpuinfo names).
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> tuple:
    """(model name, set of flags) from /proc/cpuinfo, or (platform's processor, empty) elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or "unknown", set()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_flags() -> set:
    """The CPU's feature flags as Linux names them (empty elsewhere)."""
    return _cpuinfo()[1]


def cpu() -> dict:
    model, flags = _cpuinfo()
    return {"model": model, "threads": torch.get_num_threads(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "features": [f for f in FLAGS if f in flags]}


def describe(info: dict) -> str:
    return (f"{info['model']}, {info['threads']} threads, torch {info['torch_capability']}, "
            f"{' '.join(info['features']) or 'no listed features'}")


def activation_dtype(device: torch.device) -> torch.dtype:
    """What the layer benchmarks run in: bf16 on a GPU, and on a CPU whose matmul has native bf16 (avx512_bf16
    or AMX, the same test as our NF4 matmul's 16-bit path); fp32 elsewhere, where torch's bf16 matmul is a slow
    fallback that would measure the fallback, not the layers."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & cpu_flags() else torch.float32
