"""Every CUDA launcher, run on the CPU under the compilers' sanitizers: tests/emulation/every_launcher.cpp
calls each one on heap buffers of exactly the size its launch may touch, over the emulated kernels
(tests/emulated.py), as a subprocess (so a sanitizer's abort fails a test, not the suite).
- ThreadSanitizer: no two CUDA threads touch the same memory without a barrier between them (a CPU
  stand-in for compute-sanitizer's racecheck: a missing __syncthreads, two threads writing one output).
- AddressSanitizer: no access past a buffer's end, also a read whose value no output uses, which the
  guard margins of the emulated tests cannot see (a CPU stand-in for memcheck)."""
import os
import re
import shutil
import subprocess

import pytest

import emulated


def _run(exe, **env):
    return subprocess.run([exe], capture_output=True, text=True, timeout=600, env=dict(os.environ, **env))


def test_every_kernel_is_race_free(tmp_path):
    exe, why = emulated.build_every_launcher(str(tmp_path), "thread")
    if exe is None:
        pytest.skip(why)
    result = _run(exe, TSAN_OPTIONS="exitcode=66 halt_on_error=0")
    races = result.stderr.count("WARNING: ThreadSanitizer")
    assert result.returncode == 0 and races == 0, f"{races} race report(s):\n{result.stderr[-6000:]}"
    assert "every_launcher: done" in result.stdout


@pytest.fixture(scope="module")
def address_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("asan")
    exe, why = emulated.build_every_launcher(str(out), "address")
    if exe is None:
        pytest.skip(why)
    return out, exe


def test_every_launcher_stays_inside_its_buffers(address_build):
    _, exe = address_build
    result = _run(exe, ASAN_OPTIONS="detect_leaks=0")
    assert result.returncode == 0 and "ERROR: AddressSanitizer" not in result.stderr, result.stderr[-6000:]
    assert "every_launcher: done" in result.stdout


def test_a_read_past_the_end_whose_value_is_unused_is_caught(address_build, tmp_path):
    """The bug the emulated tests miss: the b-staging guard of lora_gemm.cuh planted as `j <= p.N`
    reads one element past each row of b (past the buffer's end on the last), a value that is then
    multiplied into no output. The sanitized driver must abort on it."""
    built, _ = address_build
    csrc = tmp_path / "csrc"
    shutil.copytree(emulated.CSRC, csrc)
    header = csrc / "lora" / "lora_gemm.cuh"
    source = header.read_text()
    planted, count = re.subn(r"\(k < ke && j < p\.N\) \? p\.b\[", "(k < ke && j <= p.N) ? p.b[", source)
    assert count == 1, "the b-staging guard moved: update the planted bug"
    header.write_text(planted)
    objects = tmp_path / "objects"
    shutil.copytree(built, objects)  # every other object as built; lora_gemm_cuda.cu from the planted copy
    exe, why = emulated.build_every_launcher(str(objects), "address", csrc=str(csrc), only={"lora_gemm_cuda.cu"})
    result = _run(exe, ASAN_OPTIONS="detect_leaks=0")
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, result.stderr[-3000:]
    assert "READ of size 4" in result.stderr and "lowrank_gemm_kernel" in result.stderr
