"""C kernels for the hand-written training step, decoding and the digit classifier's
first layer, compiled on first use.

:func:`kernels` compiles ``step_kernels.c`` with the machine's C compiler into the cache
folder (``$GLO_SEARCH_CACHE/native``, else ``~/.cache/glo-search/native``) and loads it
with ctypes. The library's name carries a hash of the source, the compiler command and
the CPU's instruction-set flags, so a changed file, compiler or CPU (a cluster node of
another kind sharing the home folder) gets its own build. Building takes about a second
and happens once per machine. Concurrent builds (trials starting at once) each write a
private file and then rename it into place.

Without a working compiler, or with ``GLO_SEARCH_NATIVE=0``, :func:`kernels` returns
None and the step keeps its PyTorch form, which gives the same results to float
rounding and is slower. The reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("step_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
# With OpenMP the kernels split their work over PyTorch's threads: PyTorch's libgomp is
# loaded first, so the library shares its pool. Without OpenMP they run on one thread.
OPENMP = "-fopenmp"
ENV_SWITCH = "GLO_SEARCH_NATIVE"  # "0" turns the C kernels off

_POINTER = ctypes.c_void_p
_INT = ctypes.c_int64
_FLOAT = ctypes.c_float
SIGNATURES = {
    "stage_scatter": [_POINTER] * 5 + [_INT] * 5,
    "stage_gather": [_POINTER, _POINTER, _POINTER, _INT, _INT, _INT, _INT, _INT],
    "stage_loss": [_POINTER] * 5 + [_INT] * 4 + [_FLOAT] * 3,
    "stage_gather_positions": [_POINTER] * 3 + [_INT] * 4,
    "norm_relu_forward": [_POINTER] * 8 + [_INT] * 3 + [_FLOAT] * 2,
    "norm_relu_backward": [_POINTER] * 9 + [_INT] * 3,
    "conv_pool_relu": [_POINTER] * 4 + [_INT] * 5,
}


def _compiler() -> str | None:
    """Return the compiler command: $CC (which may hold several words, as in "ccache gcc"),
    else cc or gcc."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    """Return the CPU's instruction-set flags, or its name where /proc/cpuinfo is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(compiler: str) -> Path:
    """Return the path of the build for this source, compiler, flags and CPU."""
    from glo_search.classifier import cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update(_cpu_flags().encode())
    return cache_dir() / "native" / f"step_kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, private = tempfile.mkstemp(prefix="building-", suffix=".so", dir=target.parent)
    os.close(handle)
    portable = [flag for flag in FLAGS if flag != "-march=native"]
    try:
        # The first flag set that compiles wins: OpenMP, then one thread, then no -march.
        for flags in ([*FLAGS, OPENMP], FLAGS, portable):
            result = subprocess.run(
                [*shlex.split(compiler), *flags, str(SOURCE), "-o", private, "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()}")
        os.replace(private, target)
    finally:
        if os.path.exists(private):
            os.unlink(private)


class Kernels:
    """The library's functions, taking tensors where the C code takes pointers.

    The C code trusts its arguments: every tensor must be float32 (float64 for the loss
    sums), contiguous, in CPU memory and of the size its comment in step_kernels.c gives.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, arguments in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = arguments
            function.restype = None
            setattr(self, name, _taking_tensors(function))


def _taking_tensors(function: Callable) -> Callable:
    def call(*args):
        return function(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])

    return call


@functools.cache
def kernels() -> Kernels | None:
    """Return the loaded C kernels, building them first if needed; None if unavailable."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("C kernels turned off by %s=0; the step runs in PyTorch", ENV_SWITCH)
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "no C compiler found (set CC or install gcc); the training step runs in "
            "PyTorch, about 1.3x slower"
        )
        return None
    target = library_path(compiler)
    try:
        if not target.exists():
            logger.info("compiling the training step's C kernels into %s", target)
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning(
            "could not build the training step's C kernels (%s); the step runs in "
            "PyTorch, about 1.3x slower",
            error,
        )
        return None
    return Kernels(library)
