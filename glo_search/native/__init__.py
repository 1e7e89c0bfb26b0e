"""C kernels for the hand-written training step, decoding, the digit classifier's
convolutions and the leakage probe's objective, compiled on first use.

:func:`kernels` compiles ``step_kernels.c`` with the machine's C compiler into the cache
folder (``$GLO_SEARCH_CACHE/native``, else ``~/.cache/glo-search/native``) and loads it
with ctypes. The library's name carries a hash of the source, the compiler (its command,
and its program's size and time), the flags and the CPU's instruction-set flags. A
changed file, compiler or CPU (a cluster node of another kind sharing the home folder)
therefore gets its own build. Building takes about a second and happens once per machine.
Concurrent builds (trials starting at once) each write a private file and then rename
it into place, and a checksum written after the rename guards against loading a
truncated or overwritten file.

Without a working compiler, or with ``GLO_SEARCH_NATIVE=0``, :func:`kernels` returns
None and the same computations run in PyTorch operations, more slowly. Their results
differ from the kernels' by float rounding, which training amplifies over epochs about as
much as changing the number of threads does. The reason is logged once per process."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("step_kernels.c")
# -fno-trapping-math lets loops that choose between values (the sigmoid, ReLU) use
# vector instructions. -ffp-contract=fast lets a * b + c become one multiply-add, which
# -std=c11 otherwise forbids.
FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-fPIC",
    "-shared",
    "-std=c11",
]
# With OpenMP the kernels split their work over PyTorch's threads: PyTorch's libgomp is
# loaded first, so the library shares its pool. Without OpenMP they run on one thread.
OPENMP = "-fopenmp"
# Channels of the maps that the convolution stages take, fixed in step_kernels.c.
MAP_CHANNELS = 16
# Classes that logistic_objective takes at most, fixed in step_kernels.c.
PROBE_MAX_CLASSES = 16
# Status codes that the kernels return besides 0, as step_kernels.c defines them.
NO_MEMORY = 1
ODD_PAD = 2
ENV_SWITCH = "GLO_SEARCH_NATIVE"  # one of OFF_VALUES turns the C kernels off
OFF_VALUES = ("0", "false", "no", "off")
BUILD_TIMEOUT_S = 120
STALE_BUILD_S = 3600  # age after which a private build file is taken as left by a killed build

_POINTER = ctypes.c_void_p
_INT = ctypes.c_int64
_FLOAT = ctypes.c_float
_DOUBLE = ctypes.c_double
SIGNATURES = {
    "stage_forward": [_POINTER] * 6 + [_INT] * 4,
    "stage_backward": [_POINTER] * 6 + [_INT] * 4,
    "stage_loss": [_POINTER] * 6 + [_INT] * 4 + [_FLOAT] * 3,
    "stage_loss_backward": [_POINTER] * 6 + [_INT] * 4,
    "norm_relu_forward": [_POINTER] * 8 + [_INT] * 3 + [_FLOAT] * 2,
    "norm_relu_backward": [_POINTER] * 9 + [_INT] * 3,
    "conv_pool_relu": [_POINTER] * 4 + [_INT] * 5,
    "winograd_conv_pool_relu": [_POINTER] * 4 + [_INT] * 3,
    "logistic_objective": [_POINTER] * 5 + [_INT] * 3 + [_DOUBLE],
    "style_sums": [_POINTER] * 2 + [_INT] * 3,
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


def _compiler_identity(command: list[str]) -> str:
    """Return the compiler command with its program's size and modification time, so that
    an upgraded compiler gets a build of its own."""
    program = shutil.which(command[0]) if command else None
    try:
        status = os.stat(program) if program else None
    except OSError:
        status = None
    stamp = f"{status.st_size}:{status.st_mtime_ns}" if status else "unknown"
    return " ".join(command) + " " + stamp


def library_path(command: list[str]) -> Path:
    """Return the path of the build for this source, compiler, flags and CPU."""
    from glo_search.classifier import cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_identity(command), " ".join(FLAGS), _cpu_flags()):
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir() / "native" / f"step_kernels-{key.hexdigest()[:16]}.so"


def _checksum_path(target: Path) -> Path:
    return target.with_suffix(".sha256")


def _failure_path(target: Path) -> Path:
    return target.with_suffix(".failed")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """Return whether target exists with the checksum written after its build.

    A truncated or overwritten library fails the check, so it is rebuilt instead of
    loaded: loading a truncated one kills the process with SIGBUS.
    """
    try:
        return _checksum_path(target).read_text().strip() == _sha256(target)
    except OSError:
        return False


def _remove_stale_builds(folder: Path) -> None:
    """Delete private build files that a killed build left, once they are an hour old."""
    cutoff = time.time() - STALE_BUILD_S
    for path in folder.glob("building-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def _run_compiler(command: list[str]) -> subprocess.CompletedProcess:
    """Run a compiler command in its own process group, and kill the whole group on a
    timeout, so that no cc1 or as outlives it."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise OSError(
                f"{shlex.join(command[:1])} took over {BUILD_TIMEOUT_S} s and was stopped"
            ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _build(command: list[str], target: Path) -> None:
    """Compile the kernels into target and write its checksum next to it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent)
    handle, private = tempfile.mkstemp(prefix="building-", suffix=".so", dir=target.parent)
    os.close(handle)
    portable = [flag for flag in FLAGS if flag != "-march=native"]
    try:
        # The first flag set that compiles wins: OpenMP, then one thread, then no -march.
        for flags in ([*FLAGS, OPENMP], FLAGS, portable):
            os.truncate(private, 0)
            result = _run_compiler([*command, *flags, str(SOURCE), "-o", private, "-lm"])
            if result.returncode == 0 and os.path.getsize(private) > 0:
                break
        else:
            detail = result.stderr.strip() or "no output file was written"
            raise OSError(f"{shlex.join(command)} exited with {result.returncode}: {detail}")
        os.chmod(private, 0o755)  # readable by every user of a shared cache folder
        checksum = _sha256(Path(private))
        os.replace(private, target)
        checksum_file = _checksum_path(target)
        temporary = checksum_file.with_name(f"building-{os.getpid()}-{checksum_file.name}")
        temporary.write_text(checksum + "\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, checksum_file)
    finally:
        if os.path.exists(private):
            os.unlink(private)


class Kernels:
    """The library's functions, taking tensors where the C code takes pointers.

    The C code trusts its arguments: every tensor must be contiguous, in CPU memory, of
    the size its comment in step_kernels.c gives, and float32, except for float64 loss
    sums and probe objectives and the probe's int64 labels.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, arguments in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = arguments
            function.restype = ctypes.c_int
            setattr(self, name, _taking_tensors(name, function))


def _taking_tensors(name: str, function: Callable) -> Callable:
    def call(*args) -> None:
        status = function(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])
        if status == NO_MEMORY:
            raise MemoryError(
                f"C kernel {name}: out of memory for its working arrays; for the training "
                "kernels, a smaller batch_size needs less"
            )
        if status == ODD_PAD:
            raise ValueError(f"C kernel {name}: invalid odd pad, the stages take an even pad only")
        if status != 0:
            raise RuntimeError(f"C kernel {name} failed with status {status}")

    return call


def _fall_back(reason: str) -> None:
    logger.warning(
        "%s; training, decoding and the digit classifier run in PyTorch operations instead, "
        "and the leakage probe in NumPy "
        "(training about 1.6-2.1x slower)",
        reason,
    )


@functools.cache
def kernels() -> Kernels | None:
    """Return the loaded C kernels, building them first if needed; None if unavailable.

    A build that failed is recorded next to the library's path, so that later processes
    (each Ray worker of a sweep) fall back at once instead of trying again. Deleting that
    ``.failed`` file, or changing $CC, tries again.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in OFF_VALUES:
        logger.info(
            "C kernels turned off by %s; PyTorch and NumPy operations run instead", ENV_SWITCH
        )
        return None
    compiler = _compiler()
    if compiler is None:
        _fall_back("no C compiler found (install gcc or set CC)")
        return None
    try:
        command = shlex.split(compiler)
    except ValueError as error:
        _fall_back(f"invalid CC value {compiler!r} ({error})")
        return None
    if not command:
        _fall_back("CC is set but empty")
        return None
    target = library_path(command)
    failure = _failure_path(target)
    if failure.exists():
        _fall_back(
            f"building the C kernels failed before ({failure.read_text().strip()}); "
            f"delete {failure} to try again"
        )
        return None
    try:
        if not _verified(target):
            logger.info("compiling the C kernels into %s", target)
            _build(command, target)
    except (OSError, subprocess.SubprocessError) as error:
        try:
            failure.write_text(f"{error}\n")
        except OSError:
            pass
        _fall_back(f"could not build the C kernels ({error})")
        return None
    try:
        return Kernels(ctypes.CDLL(str(target)))
    except (OSError, AttributeError) as error:
        _fall_back(f"could not load the C kernels from {target} ({error}); delete it to rebuild")
        return None
