"""Build lora_ext._C: CPU kernels always, CUDA kernels when torch has CUDA and a toolkit is found.

Knobs (environment):
  USE_CUDA=0              build the CPU kernels only
  FORCE_CUDA=1            build the CUDA kernels even if detection says no (fails if no toolkit)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0+PTX"; default without a visible GPU: "8.0;9.0+PTX"
  MAX_JOBS                parallel compile jobs (ninja)
  DEBUG=1                 -O0 -g (and -lineinfo for nvcc)
No GPU is needed to build: the decision never looks at torch.cuda.is_available().
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_root_from_nvcc(nvcc):
    """The real toolkit root: `nvcc --dryrun` prints TOP even when nvcc on PATH is a wrapper script."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"#\$ TOP=(.*)$", line.strip())
        if m:
            top = os.path.realpath(m.group(1).strip().strip('"'))
            if os.path.isfile(os.path.join(top, "bin", "nvcc")):
                return top
    return None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root:
            return root
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(guess, "include")):
            return guess
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return os.path.realpath("/usr/local/cuda")
    return None


def wheel_cuda_include_dirs():
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include, from the nvidia-* wheels."""
    dirs = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += sorted(glob.glob(os.path.join(sp, pattern)))
    return [d for d in dirs if os.path.isdir(d)]


def should_build_cuda(torch_cuda_version, cuda_home):
    if _env_flag("FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
        return True
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False
    return torch_cuda_version is not None and cuda_home is not None


# Resolve the toolkit before torch.utils.cpp_extension reads CUDA_HOME at import time.
CUDA_HOME = find_cuda_home()
if CUDA_HOME and not _env_flag("USE_CUDA_HOME_AS_IS"):
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = should_build_cuda(torch.version.cuda, CUDA_HOME)
DEBUG = _env_flag("DEBUG")

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def extension():
    csrc = os.path.join(ROOT, "csrc")
    # *_composite.cpp: operators built from other operators, registered for every device; *_autograd.cpp:
    # operators' autograd in C++
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*", "*_cpu.cpp")) +
                 glob.glob(os.path.join("csrc", "*", "*_composite.cpp")) +
                 glob.glob(os.path.join("csrc", "*", "*_autograd.cpp")))
    cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
    # Bit-exactness with bitsandbytes needs separately rounded multiply and add.
    cxx += ["-ffp-contract=off", "-fvisibility=hidden"]
    # at::parallel_for is inline: without _OPENMP in our own translation units it runs every CPU kernel on
    # one thread. Compile with OpenMP but do not link a runtime: the GOMP symbols resolve to the libgomp
    # torch loads globally (libtorch_global_deps), so the process keeps one OpenMP thread pool.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
    define_macros = []
    if not WITH_CUDA:
        return CppExtension("lora_ext._C", cpp, include_dirs=[csrc],
                            extra_compile_args={"cxx": cxx}, define_macros=define_macros)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*", "*_cuda.cu")) +
                          glob.glob(os.path.join("csrc", "*", "*_cuda_api.cpp")))
    include_dirs = [csrc]
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        include_dirs += wheel_cuda_include_dirs()
    nvcc = ["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc += ["--expt-relaxed-constexpr", "-Xptxas=-v", "-Xptxas=-warn-spills"]
    define_macros.append(("LORA_EXT_WITH_CUDA", "1"))
    return CUDAExtension("lora_ext._C", cpp + cuda_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         define_macros=define_macros)


class BuildExt(BuildExtension):
    """Also writes lora_ext/_build_config.py beside the built library, so tests can tell a silent
    CPU-only build from a CUDA one."""

    def run(self):
        super().run()
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("lora_ext._C")), "_build_config.py")
        with open(target, "w") as f:
            f.write("# Written by setup.py when lora_ext._C was built.\n")
            f.write(f"WITH_CUDA = {WITH_CUDA!r}\nCUDA_ARCH_LIST = {arch!r}\nTORCH_VERSION = {torch.__version__!r}\n")
            f.write(f"CUDA_HOME = {CUDA_HOME if WITH_CUDA else None!r}\nDEBUG = {DEBUG!r}\n")


print(f"lora_ext: building with CUDA={WITH_CUDA} CUDA_HOME={CUDA_HOME} "
      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')} DEBUG={DEBUG}", flush=True)

setup(
    packages=find_packages(include=["lora_ext", "lora_ext.*"]),
    package_data={"lora_ext": ["data/*.txt"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
