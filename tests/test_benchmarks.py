"""The sweep benchmarks run end to end and their figures add up.

They reach into the trainer's caches and Tune's callbacks, so a change there can break
them without any other test noticing. Nothing here checks a speed.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from processes import REPO, child_env, run

pytestmark = pytest.mark.slow


def run_benchmark(tmp_path, *args: str, timeout: float = 600) -> dict:
    """Run a benchmarks/ script with --json; return the figures it printed.

    The script runs in its own process group, which ends with the test, Ray's processes
    included.
    """
    log = tmp_path / "benchmark.log"
    command = [sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:], "--json"]
    code = run(command, log, child_env(), timeout)
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
    assert all(math.isfinite(seconds) and seconds > 0 for seconds in figures.values())


def test_overhead_parts_add_up(tmp_path):
    figures = run_benchmark(
        tmp_path, "sweep_speed.py", "overhead", "--variants", "fifo-e20", "--trials", "2",
        "--storage", str(tmp_path / "runs"),
    )["fifo-e20"]  # fmt: skip
    assert figures["trials"] == 2
    assert figures["trial_epochs"] == 40  # FIFO trains every trial to epoch 20
    assert figures["reports"] == 2  # metrics, and so results, at epoch 20 only
    shares = figures["train_share"] + figures["eval_share"] + figures["rest_share"]
    assert shares == pytest.approx(1.0)
    assert 0 < figures["train_share"] < 1
    parts = figures["parts_s_per_trial"]
    assert sum(parts.values()) == pytest.approx(figures["rest_s_per_trial"], abs=1e-6)
    # The trainable's timers are never negative. The time between trials is a difference
    # of sums, so it may miss zero by rounding.
    assert all(seconds >= -1e-6 for key, seconds in parts.items() if key != "in_trial_other")
