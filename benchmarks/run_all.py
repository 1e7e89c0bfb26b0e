"""Run every speed benchmark in turn and print each command with its output.

    python benchmarks/run_all.py [--with-search]

Takes about 20 minutes on 2 cores; --with-search adds the search-efficiency figure
(about 30 minutes more). Run it on an otherwise idle machine: the figures are ratios
measured side by side, but a busy machine still makes them noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = [
    ["speed.py", "arithmetic", "--threads", "1"],
    ["speed.py", "arithmetic"],
    ["speed.py", "plain", "--threads", "1"],
    ["speed.py", "plain"],
    ["speed.py", "pair", "--threads", "1"],
    ["speed.py", "kernels", "--threads", "1"],
    ["speed.py", "metrics", "--threads", "1"],
    ["speed.py", "classifier", "--threads", "1"],
    ["speed.py", "memory"],
    ["sweep_speed.py", "overhead"],
    ["sweep_speed.py", "overhead", "--variants", "fifo-e20-warm", "--repeat", "3"],
    ["sweep_speed.py", "parts"],
]
SEARCH = ["sweep_speed.py", "search"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-search", action="store_true", help="also run the search figure")
    args = parser.parse_args()
    commands = COMMANDS + ([SEARCH] if args.with_search else [])
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    failed = 0
    for command in commands:
        print(f"$ python benchmarks/{' '.join(command)}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], env=env)
        failed += result.returncode != 0
        print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
