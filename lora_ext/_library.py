"""Loads the compiled operators (lora_ext._C) if they were built; the package works without them."""

BUILD_HINT = (
    "build it from the source tree with `pip install --no-build-isolation .` "
    "(or `python setup.py build_ext --inplace` for a checkout); USE_CUDA=0 builds the CPU kernels alone"
)

try:
    from . import _C  # noqa: F401  (loading the library runs the TORCH_LIBRARY registrations)

    HAS_C = True
    IMPORT_ERROR = None
except (ImportError, OSError) as e:  # not built, or built against another torch
    HAS_C = False
    IMPORT_ERROR = e


def require_compiled(what: str) -> None:
    if not HAS_C:
        raise RuntimeError(
            f"lora_ext.{what} needs the compiled extension lora_ext._C, which could not be loaded "
            f"({IMPORT_ERROR}); {BUILD_HINT}."
        )


def build_config():
    """What setup.py compiled (WITH_CUDA, CUDA_ARCH_LIST, ...), or None for an unbuilt tree."""
    try:
        from . import _build_config
    except ImportError:
        return None
    return _build_config
