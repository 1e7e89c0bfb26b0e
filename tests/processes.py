"""Helpers for tests that run glo-search and Ray in their own processes.

Every process a test starts gets its own session (process group). The Ray processes it
leads to use a temporary folder unique to the test, so cleanup can end exactly those
processes, by id, and never another Ray instance on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def short_temp_dir(prefix: str) -> Path:
    # Ray puts Unix sockets under its temp folder; their paths must stay under 107 bytes,
    # which pytest's tmp_path can exceed.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment with this checkout first on the import path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def start(
    command: list[str], log: Path, env: dict[str, str], cwd: Path = REPO
) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def run(
    command: list[str], log: Path, env: dict[str, str], timeout: float, cwd: Path = REPO
) -> int:
    process = start(command, log, env, cwd)
    try:
        return process.wait(timeout=timeout)
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """End a process and its process group: SIGTERM, then SIGKILL after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pids_mentioning(marker: str) -> list[int]:
    """Ids of processes whose command line contains marker (a test's unique folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def kill_mentioning(marker: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL the processes that pids_mentioning finds; return the ids it had to kill."""
    killed = pids_mentioning(marker)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while pids_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return killed


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
