"""Timing that does not flatter: warm-up, CUDA events (or perf_counter on the CPU), the median of
many runs, and inputs rotated so a small working set does not sit in cache between runs."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


# measure() settings per run size: "tiny" is for tests (a check that the code runs, not a figure).
EFFORT = {
    "full": dict(warmup=3, min_reps=10, min_time_s=0.5),
    "quick": dict(warmup=2, min_reps=5, min_time_s=0.2),
    "tiny": dict(warmup=1, min_reps=2, min_time_s=0.0),
}


@dataclass
class Timing:
    median_s: float
    min_s: float
    reps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_time(fn: Callable, args: tuple) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _cuda_time(fn: Callable, args: tuple) -> float:
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    fn(*args)
    ev1.record()
    ev1.synchronize()
    return ev0.elapsed_time(ev1) / 1e3


def _in_turns(fns: dict, arg_sets: Sequence[tuple], device: torch.device, warmup: int, min_reps: int,
              min_time_s: float, max_reps: int) -> dict:
    """Each function warmed up, then all timed in turns (A B C A B C ...) for at least min_reps rounds and
    min_time_s each: name -> Timing."""
    time_one = _cuda_time if device.type == "cuda" else _cpu_time
    for fn in fns.values():
        for i in range(warmup):
            fn(*arg_sets[i % len(arg_sets)])
    _sync(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    i = 0
    while i < max_reps and (i < min_reps or time.perf_counter() - start < min_time_s * len(fns)):
        args = arg_sets[i % len(arg_sets)]
        for name, fn in fns.items():
            times[name].append(time_one(fn, args))
        i += 1
    return {name: Timing(statistics.median(t), min(t), len(t)) for name, t in times.items()}


def measure(fn: Callable, arg_sets: Sequence[tuple], device, warmup: int = 3, min_reps: int = 10,
            min_time_s: float = 0.3, max_reps: int = 200) -> Timing:
    """Median time of fn(*arg_sets[i % len(arg_sets)]) over at least min_reps runs and min_time_s."""
    return _in_turns({"fn": fn}, arg_sets, torch.device(device), warmup, min_reps, min_time_s, max_reps)["fn"]


def measure_interleaved(fns: dict, arg_sets: Sequence[tuple], warmup: int = 3, min_reps: int = 10,
                        min_time_s: float = 0.3, max_reps: int = 200) -> dict:
    """CPU timing of several functions in turns (A B C A B C ...), so a slow spell of a shared machine
    falls on all of them alike rather than on whichever was being timed: name -> Timing."""
    return _in_turns(fns, arg_sets, torch.device("cpu"), warmup, min_reps, min_time_s, max_reps)


def rotation(make: Callable[[], tuple], working_set_bytes: int, device, cache_bytes: int | None = None) -> list:
    """Enough independent argument sets that cycling through them exceeds the cache (2x L2 on a GPU,
    2x 32 MiB on a CPU), capped at 8 sets."""
    device = torch.device(device)
    if cache_bytes is None:
        cache_bytes = 32 << 20
        if device.type == "cuda":
            cache_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    count = max(1, min(8, -(-2 * cache_bytes // max(1, working_set_bytes))))
    return [make() for _ in range(count)]

