"""Time `glo-search analyze` on a synthetic experiment of 1,000 trials of 100 epochs.

    python benchmarks/bench_analysis.py [--trials 1000] [--epochs 100] [--limit 30]

The Parquet files and the Optuna study are generated first and not timed. The analyze
command then runs in a fresh Python process, so the time includes imports. Exits with 1
when the command takes longer than --limit seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.synthetic import write_experiment  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="trials (default: 1000)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per trial (default: 100)")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds allowed (default: 30)")
    parser.add_argument("--keep", type=Path, default=None, help="write into this folder instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        experiment = work / "experiment"
        started = time.perf_counter()
        write_experiment(experiment, args.trials, args.epochs)
        print(
            f"generated {args.trials} trials x {args.epochs} epochs in "
            f"{time.perf_counter() - started:.1f} s"
        )
        command = [
            sys.executable,
            "-m",
            "glo_search.cli",
            "-q",
            "analyze",
            str(experiment),
            "--out",
            str(work / "report"),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        seconds = time.perf_counter() - started
    print(
        f"analyze: {seconds:.1f} s for {args.trials} trials x {args.epochs} epochs "
        f"on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(limit {args.limit:g} s)"
    )
    return 0 if seconds <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
