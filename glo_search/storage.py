"""Where an experiment folder lives: a local folder or a URI that pyarrow.fs understands.

``--storage`` takes a local path (relative paths are resolved against the working
directory) or a URI such as ``file:///shared/runs`` or ``s3://bucket/runs``. Ray Tune
gets the same filesystem, so trial checkpoints, Tune's experiment state and the result
files all go to one place. The files glo-search writes itself (experiment.json, the
Parquet files, the study's copy) are written whole: locally through a temporary file and
a rename, on object stores by a single upload, which replaces an object in one step.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows, where the lock below is skipped
    fcntl = None

import pyarrow.fs as pafs

from glo_search.config import ConfigError
from glo_search.io import atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentLocation:
    """An experiment folder on a pyarrow filesystem.

    ``path`` is the folder's path on ``filesystem``, without the URI scheme; ``uri`` is
    what the user gave (or the absolute local path) and what messages show.
    """

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @classmethod
    def of_result_grid(cls, grid) -> ExperimentLocation:
        """The experiment folder of a Ray Tune ResultGrid."""
        filesystem, path = grid.filesystem, grid.experiment_path.rstrip("/")
        local = isinstance(filesystem, pafs.LocalFileSystem)
        return cls(filesystem, path, path if local else f"{filesystem.type_name}://{path}")

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_dir(self) -> Path:
        """The folder as a local Path; only for local storage."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def storage_path(self) -> str:
        """The parent folder on the filesystem: Ray Tune's ``storage_path``."""
        return posixpath.dirname(self.path.rstrip("/"))

    def child(self, relative: str) -> str:
        return posixpath.join(self.path, relative)

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return not self.filesystem.get_file_info(selector)

    def has_file(self, relative: str) -> bool:
        return self.filesystem.get_file_info(self.child(relative)).type == pafs.FileType.File

    def create(self) -> None:
        """Create the folder, raising ConfigError when the storage cannot be written."""
        try:
            self.filesystem.create_dir(self.path, recursive=True)
            probe = self.child(".write-test")
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"")
            self.filesystem.delete_file(probe)
        except OSError as error:
            raise ConfigError(
                f"cannot write the experiment folder {self.uri}: {error}; "
                "choose a writable --storage"
            ) from None

    def remove(self) -> None:
        self.filesystem.delete_dir(self.path)

    def write_bytes(self, relative: str, content: bytes) -> None:
        if self.is_local:
            atomic_write_bytes(self.child(relative), content)
            return
        with self.filesystem.open_output_stream(self.child(relative)) as stream:
            stream.write(content)

    def read_bytes(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.child(relative)) as stream:
            return stream.readall()

    def open_input_file(self, relative: str):
        """A seekable file, as pyarrow.parquet needs."""
        if self.is_local:
            return self.filesystem.open_input_file(self.child(relative))
        return io.BytesIO(self.read_bytes(relative))

    def upload(self, local_file: Path, relative: str) -> None:
        self.write_bytes(relative, Path(local_file).read_bytes())

    def download(self, relative: str, local_file: Path) -> None:
        Path(local_file).write_bytes(self.read_bytes(relative))


def is_uri(value: str) -> bool:
    return "://" in value


def _filesystem_and_path(value: str) -> tuple[pafs.FileSystem, str, str]:
    if not is_uri(value):
        path = Path(value).expanduser().resolve()
        return pafs.LocalFileSystem(), str(path), str(path)
    try:
        filesystem, path = pafs.FileSystem.from_uri(value)
    except (ValueError, OSError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise ConfigError(
            f"invalid storage URI {value!r}: {error}; give a local folder or a URI that "
            "pyarrow.fs understands, such as file:///abs/path or s3://bucket/path"
        ) from None
    uri = value.rstrip("/")
    if isinstance(filesystem, pafs.LocalFileSystem):
        uri = path  # file:// URIs print as plain paths
    return filesystem, path.rstrip("/"), uri


def locate(storage: str | Path, name: str) -> ExperimentLocation:
    """The experiment folder ``name`` under ``storage`` (a local path or a URI)."""
    filesystem, path, uri = _filesystem_and_path(str(storage))
    return ExperimentLocation(filesystem, posixpath.join(path, name), f"{uri}/{name}")


def open_experiment(experiment: str | Path) -> ExperimentLocation:
    """An existing experiment folder given as a local path or a URI."""
    filesystem, path, uri = _filesystem_and_path(str(experiment))
    return ExperimentLocation(filesystem, path, uri)


def sqlite_url(path: str | Path) -> str:
    """Return the SQLAlchemy URL of a SQLite file.

    The path is escaped, so that a folder named with '%', '?' or '#' stays part of it
    instead of being decoded or cut off, which would open another file.
    """
    from sqlalchemy.engine import URL

    database = str(Path(path).resolve())
    return URL.create("sqlite", database=database).render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path:
    """Return the file of a SQLite URL, as SQLAlchemy reads it."""
    from sqlalchemy.engine import make_url

    return Path(make_url(url).database)


# Held by the process that runs a sweep or a resume in a local experiment folder.
LOCK_FILE = ".glo-search.lock"


@contextmanager
def driver_lock(location: ExperimentLocation) -> Iterator[None]:
    """Hold an exclusive lock on a local experiment folder while a sweep runs in it.

    Two drivers in one folder (a resume started while the sweep still runs) would each
    run the same trials and delete each other's checkpoints. The lock is an flock on
    LOCK_FILE, which the system releases when the process ends, however it ends. The
    file keeps the holder's process id for the message. Folders on object stores are
    not locked.
    """
    if fcntl is None or not location.is_local:
        yield
        return
    path = Path(location.path) / LOCK_FILE
    descriptor = _open_lock_file(path)
    with os.fdopen(descriptor, "r+b" if _writable(descriptor) else "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"another glo-search process (pid {holder}) is running the sweep in "
                f"{location.uri}; wait for it to end, or stop it (Ctrl-C) and resume then"
            ) from None
        if handle.writable():
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n".encode())
            handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_lock_file(path: Path) -> int:
    """Open the lock file without following a link; read-only if it cannot be written."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            return os.open(path, flags | os.O_RDWR, 0o644)
        except PermissionError:
            return os.open(path, flags | os.O_RDONLY)  # flock needs no write access
    except OSError as error:
        if path.is_symlink():
            problem = "it is a symbolic link"
        elif path.is_dir():
            problem = "it is a folder"
        else:
            problem = error.strerror
        raise ConfigError(
            f"cannot lock {path}: {problem}; remove it (glo-search makes it again)"
        ) from None


def _writable(descriptor: int) -> bool:
    return fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
