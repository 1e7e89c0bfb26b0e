"""Atomic file writes: a reader never sees a half-written result file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside path, then rename it onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(tmp_path)
        # mkstemp creates the file readable by its owner only; give the result the
        # permissions a plain open() would, so others on shared storage can read it.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, content: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(content))


def atomic_write_text(path: str | Path, content: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(content))
