"""Builds the CUDA sources (csrc/*/*_cuda.cu) with the host compiler under tests/emulation/
cuda_emulation.h, plus the C entry points of tests/emulation/launchers_emulated.cpp. There are three
builds: a shared library for ctypes, with which the tests run the real kernels and launchers on the
CPU; and tests/emulation/every_launcher.cpp as an executable, once with ThreadSanitizer (races) and
once with AddressSanitizer (any access past a buffer's end)."""
import ctypes
import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
EMULATION = os.path.join(HERE, "emulation")

c_i64, c_int, c_ptr, c_f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
SCALES = [c_ptr] * 5 + [c_int]  # absmax, qabsmax, nested_absmax, nested_code, offset, nested_log2
SIGNATURES = {
    "emu_quantize_nf4": (None, [c_ptr, c_int, c_ptr, c_ptr, c_i64, c_int]),
    "emu_double_quant": (None, [c_ptr] * 5 + [c_i64, c_int]),
    "emu_dequantize_nf4": (None, [c_ptr] + SCALES + [c_ptr, c_i64, c_int, c_int]),
    "emu_nf4_gemv": (None, [c_ptr, c_i64, c_ptr] + SCALES + [c_ptr, c_ptr, c_i64, c_i64, c_i64, c_int, c_int]),
    "emu_merge": (None, [c_ptr] * 3 + [c_i64] * 3 + [c_f64, c_f64, c_int]),
    "emu_merge_nf4": (None, [c_ptr] + SCALES + [c_int, c_ptr, c_ptr, c_i64, c_i64, c_i64, c_f64, c_ptr, c_ptr]),
    "emu_dropout": (None, [c_ptr, c_ptr, c_i64, c_f64, ctypes.c_uint64, c_int]),
    "emu_lora_forward": (c_int, [c_ptr, c_int, c_ptr, c_ptr, c_ptr, c_int, c_ptr, c_ptr] + [c_i64] * 4
                         + [ctypes.c_float, c_f64, ctypes.c_uint64, c_i64, c_ptr, c_ptr]),
    "emu_column_dots": (c_int, [c_ptr, c_ptr, c_int, c_ptr, c_i64, c_i64, c_i64]),
    "emu_column_dot_splits": (c_int, [c_i64] * 3),
    "emu_lora_backward": (c_int, [c_ptr, c_int, c_ptr, c_int] + [c_ptr] * 8 + [c_i64] * 4
                          + [ctypes.c_float, c_f64, ctypes.c_uint64, c_i64]),
    "emu_multi_lora": (c_int, [c_ptr, c_int, c_ptr, c_int] + [c_ptr] * 7 + [c_i64] * 7 + [c_int]),
    "emu_multi_shrink_splits": (c_int, [c_i64] * 4),
    "emu_set_tensor_cores": (None, [c_int]),
    "emu_mma_calls": (ctypes.c_uint64, []),
    "emu_lowrank_gemm": (c_int, [c_ptr, c_i64, c_i64, c_int, c_ptr, c_i64, c_i64, c_ptr, c_ptr, c_int, c_ptr]
                         + [c_i64] * 3 + [c_int, ctypes.c_float, c_int, c_int, c_f64, ctypes.c_uint64]),
}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # the launch headers' DType


def cuda_include_dirs():
    dirs = []
    try:
        from lora_ext import _build_config
        if _build_config.CUDA_HOME:
            dirs.append(os.path.join(_build_config.CUDA_HOME, "include"))
    except ImportError:
        pass
    dirs += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "include")))
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h"))]


def _compiler():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    includes = cuda_include_dirs()
    if cxx is None or not includes:
        return None, None, "needs a C++20 compiler and the CUDA headers (toolkit or nvidia-* wheels)"
    return cxx, includes, None


def _compile_objects(cxx, includes, out_dir, extra_flags, csrc=CSRC, only=None):
    """Every csrc/*/*_cuda.cu under the emulation header, plus the C entry points: the object files.
    csrc: another copy of the sources (a test that plants a bug); only: rebuild just the sources whose
    file name is listed, keeping the objects already in out_dir."""
    # Strict aliasing stays on, and contraction off as for the CPU kernels: the emulation should catch
    # what the host compiler is entitled to miscompile.
    flags = ["-std=c++20", "-fPIC", "-ffp-contract=off", *extra_flags, f"-I{csrc}", *[f"-I{d}" for d in includes]]
    jobs = [[cxx, *flags, "-DLORA_EXT_CUDA_EMULATION", "-include", os.path.join(EMULATION, "cuda_emulation.h"),
             "-x", "c++", "-c", src, "-o", os.path.join(out_dir, os.path.basename(src) + ".o")]
            for src in sorted(glob.glob(os.path.join(csrc, "*", "*_cuda.cu")))]
    jobs.append([cxx, *flags, "-c", os.path.join(EMULATION, "launchers_emulated.cpp"), "-o",
                 os.path.join(out_dir, "launchers_emulated.o")])
    todo = [j for j in jobs if only is None or os.path.basename(j[-3]) in only]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), todo):
            if result.returncode != 0:
                raise RuntimeError(f"emulation build failed:\n{' '.join(result.args)}\n{result.stderr[-4000:]}")
    return [j[-1] for j in jobs]


SANITIZERS = {"thread": "libtsan.so", "address": "libasan.so"}


def build_every_launcher(out_dir, sanitizer, csrc=CSRC, only=None):
    """tests/emulation/every_launcher.cpp over the kernels, all built with -fsanitize=`sanitizer`
    ("thread" or "address"): the executable's path, or None with the reason. csrc and only as for
    _compile_objects."""
    cxx, includes, why = _compiler()
    if cxx is None:
        return None, why
    probe = subprocess.run([cxx, f"-print-file-name={SANITIZERS[sanitizer]}"], capture_output=True,
                           text=True).stdout.strip()
    if not os.path.isabs(probe):
        return None, f"the compiler has no {sanitizer} sanitizer runtime ({SANITIZERS[sanitizer]})"
    flags = ["-O1", "-g", f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer"]
    objects = _compile_objects(cxx, includes, out_dir, flags, csrc, only)
    exe = os.path.join(out_dir, f"every_launcher_{sanitizer}")
    subprocess.run([cxx, "-std=c++20", *flags, os.path.join(EMULATION, "every_launcher.cpp"), *objects, "-o", exe,
                    "-lpthread"], check=True, capture_output=True)
    return exe, None


def build(out_dir):
    """The emulated kernels as a ctypes library, or None (with the reason) without a compiler or headers."""
    cxx, includes, why = _compiler()
    if cxx is None:
        return None, why
    objects = _compile_objects(cxx, includes, out_dir, ["-O2"])
    lib = os.path.join(out_dir, "cuda_emulated.so")
    subprocess.run([cxx, "-shared", *objects, "-o", lib, "-lpthread"], check=True, capture_output=True)
    dll = ctypes.CDLL(lib)
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, argtypes
    return dll, None


def ptr(t):
    """A tensor's data pointer for ctypes, None for None. Hold the tensor by a name until the call
    returns: ptr(a.double()) points into a temporary that is freed at once."""
    return None if t is None else t.data_ptr()


def code(dtype):
    return DTYPE_CODE[dtype]


GUARD = 64  # elements of margin on each side: keeps a 16-byte-aligned start for every dtype


class Guarded:
    """A tensor placed inside a larger buffer, with margins of NaN (floating) or 0xA5 (bytes). A
    kernel that reads past the tensor's ends picks up NaN, and one that writes past them changes a
    margin, which check() reports. This is a CPU stand-in for compute-sanitizer's memcheck."""

    def __init__(self, like: torch.Tensor, offset: int = 0):
        """A guarded copy of `like`, starting `offset` elements (< GUARD) past an aligned address."""
        flat = like.reshape(-1)
        fill = float("nan") if flat.is_floating_point() else 0xA5
        self.buf = torch.full((flat.numel() + 2 * GUARD,), fill, dtype=flat.dtype)
        self.t = self.buf[GUARD + offset:GUARD + offset + flat.numel()].view(like.shape)
        self.t.copy_(like)
        self.margins = self._margins().clone()

    def _margins(self):
        as_bytes = self.buf.view(torch.uint8)
        edge = GUARD * self.buf.element_size()
        return torch.cat([as_bytes[:edge], as_bytes[-edge:]])

    def check(self):
        assert torch.equal(self._margins(), self.margins), "a kernel wrote outside its output"
        return self.t
