"""The sweep benchmarks run end to end, and the overhead figures add up.

They reach into the trainer's caches and Tune's callbacks, so a change there can break
them without any other test noticing. Nothing here checks a speed.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
from processes import REPO, child_env, kill_mentioning, run, short_temp_dir

pytestmark = pytest.mark.slow


def run_benchmark(tmp_path, *args: str, timeout: float = 600) -> dict:
    """Run a benchmarks/ script with --json and return the figures it printed.

    The script runs in its own process group, and Ray's processes in a temporary folder
    of their own. Both end with the test.
    """
    log = tmp_path / "benchmark.log"
    command = [sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:], "--json"]
    ray_dir = short_temp_dir("glo-ray-")
    try:
        code = run(command, log, child_env(RAY_TMPDIR=str(ray_dir)), timeout)
    finally:
        kill_mentioning(str(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)
    output = log.read_text(errors="replace")
    assert code == 0, output[-4000:]
    last_json = next(line for line in reversed(output.splitlines()) if line.startswith("{"))
    return json.loads(last_json)


def test_parts_times_each_cost(tmp_path):
    figures = run_benchmark(tmp_path, "sweep_speed.py", "parts")
    assert set(figures) == {
        "trainer setup, data and swaps again",
        "trainer setup, cached",
        "study read per result",
        "on_trial_result",
    }
    for name, seconds in figures.items():
        assert math.isfinite(seconds), name
        assert seconds > 0, name


def test_overhead_parts_add_up(tmp_path):
    # Three trials on two slots, so that one slot runs a second trial and the driver's
    # time between trials is split by slot.
    figures = run_benchmark(
        tmp_path, "sweep_speed.py", "overhead", "--variants", "fifo-e20", "--trials", "3",
        "--storage", str(tmp_path / "runs"),
    )["fifo-e20"]  # fmt: skip
    assert figures["trials"] == 3
    assert figures["trial_epochs"] == 60  # FIFO trains every trial to epoch 20
    assert figures["reports"] == 3  # metrics, and so results, at epoch 20 only
    assert 0 < figures["train_share"] < 1
    assert 0 < figures["eval_share"] < figures["train_share"]
    parts = figures["parts_s_per_trial"]
    assert parts["sweep_start"] > 0
    # in_trial_other is the trial's time in Tune less its timers, so it may go below 0
    # when the timers overlap. Every other part is a time span of its own.
    for key, seconds in parts.items():
        if key != "in_trial_other":
            assert seconds >= 0, key
    assert sum(parts.values()) == pytest.approx(figures["rest_s_per_trial"], abs=1e-6)


def test_memory_excludes_parent_peak(tmp_path):
    # The parent touches 3 GiB before it runs the benchmark. A child that reported its
    # ru_maxrss would show at least that much, because Linux carries the parent's peak
    # into it. The trial itself stays far below 3 GiB.
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "held = bytearray(3 << 30)\n"
        "held[::4096] = b'x' * len(range(0, len(held), 4096))\n"
        "import speed\n"
        "print(json.dumps(speed.memory(None)))\n"
    )
    log = tmp_path / "memory.log"
    code = run([sys.executable, "-c", script], log, child_env(), 300)
    output = log.read_text(errors="replace")
    assert code == 0, output[-4000:]
    figures = json.loads(output.strip().splitlines()[-1])
    assert set(figures) == {"default", "largest of the default space"}
    for name, values in figures.items():
        assert 0 < values["imports_mib"] <= values["peak_mib"], name
        assert values["peak_mib"] < 2048, name
