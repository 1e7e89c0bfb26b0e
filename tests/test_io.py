import os
import stat

from glo_search.io import atomic_write_text


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "result.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_atomic_write_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "result.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "result.txt").stat().st_mode) == 0o644
