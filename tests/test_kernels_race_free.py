"""No two CUDA threads of our kernels touch the same memory without a barrier between them. The
emulated kernels (tests/emulated.py) and a driver that calls every launcher are built with
ThreadSanitizer, and the driver runs as a subprocess. This is a CPU stand-in for
compute-sanitizer's racecheck. It covers a missing __syncthreads, or two threads writing one output."""
import os
import subprocess

import pytest

import emulated


def test_every_kernel_is_race_free(tmp_path):
    exe, why = emulated.build_race_driver(str(tmp_path))
    if exe is None:
        pytest.skip(why)
    env = dict(os.environ, TSAN_OPTIONS="exitcode=66 halt_on_error=0")
    result = subprocess.run([exe], capture_output=True, text=True, timeout=600, env=env)
    races = result.stderr.count("WARNING: ThreadSanitizer")
    assert result.returncode == 0 and races == 0, f"{races} race report(s):\n{result.stderr[-6000:]}"
    assert "race_driver: done" in result.stdout
