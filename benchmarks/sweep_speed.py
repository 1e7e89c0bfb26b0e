"""Sweep figures: where a sweep's wall time goes, and how fast each searcher finds the best.

    python benchmarks/sweep_speed.py overhead   # 8 trials x 20 epochs, 2 at once
    python benchmarks/sweep_speed.py search     # Optuna+ASHA, random+ASHA, grid; 3 seeds
    python benchmarks/sweep_speed.py parts      # per-trial and per-result costs, no Ray

overhead and search start Ray in this process with --cpus CPUs (default 2) and write
experiment folders under --storage (default: a temporary folder, deleted at the end).

overhead: 8 trials of the `default` space, each trained for 20 epochs (Tune's FIFO
scheduler), then the same with ASHA, 2 trials at once with 1 CPU each. The timer runs
from the sweep() call, with Ray already running. A variant ending in -warm first asks
Ray for 2 worker processes (glo_search.warm.warm_workers), prepares Optuna's study
storage and waits 10 s, as a sweep does that follows another in a study. Two slots x
wall time splits into the seconds trials spent in train_epoch (training), in evaluate
(metrics), and the rest. Each trial reports its own seconds in train_epoch, evaluate
and the other parts with every result (glo_search.trainable.TIMERS). A Tune callback
in the driver records when each trial starts and completes, which splits the time
outside the trials.

parts: costs that a reused Ray worker or the driver pays per trial or per result,
timed without Ray, the cases alternating round by round (median of 15). The first pair is
a trial's trainer setup with the worker's cached dataset and swaps, against reading the
data and computing the swaps again. The second pair is the driver's per-result Optuna
calls: reading the trial back from the SQLite study, against the searcher's
on_trial_result, which writes one value.

search: a grid of 48 configurations of a reduced `report` space, trained to --epochs
without early stopping, sets the target: the best disentanglement any of its trials
reaches. Optuna's TPE with ASHA and random search with ASHA then get up to 48 trials over
the same choices, once per seed. The figure is the number of trial-epochs each method
trains before a trial first reaches the target, counted in the order the results arrived.
Every trial trains with seed 0, so a configuration learns the same curve under every
method; the grid therefore runs once, and each seed replays its trials in a random order.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
from common import interleaved, machine
from optuna.distributions import CategoricalDistribution
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from glo_search import classifier
from glo_search.search import (
    _start_study_preparation,
    configure_tune_environment,
    ensure_ray,
    make_scheduler,
    sweep,
)
from glo_search.warm import warm_workers

SEARCH_SPACE = {
    "class_dim": [5, 15, 50],
    "content_dim": [10, 50],
    "noise_std": [0.0001, 0.3, 5.0, 100.0],
    "content_decay": [0.0, 0.1],
}  # 3 x 2 x 4 x 2 = 48 configurations, a subset of the `report` space's choices
METRIC = "disentanglement"
WARM_WAIT_S = 10.0  # seconds between asking for warm workers and the sweep call
FRACTIONS = (1.0, 0.95)  # targets: the grid's best, and 95% of it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["overhead", "search", "parts"])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (default: 2)")
    parser.add_argument("--storage", type=Path, default=None, help="keep experiments here")
    parser.add_argument(
        "--variants",
        default="fifo,fifo-e20,asha,fifo-warm,fifo-e20-warm,asha-warm",
        help="overhead: comma-separated sweeps to run, each SCHEDULER[-eN][-new][-warm]: "
        "fifo (every trial to the last epoch) or asha, -eN for eval_every N (default: the "
        "sweep's, every epoch with fifo, the rungs and the last epoch with asha), -new for "
        "a new Ray worker per trial instead of reused workers, -warm for Ray workers "
        "started 10 s before the sweep call (default: each of fifo, fifo-e20 and asha, "
        "cold and warm)",
    )
    parser.add_argument(
        "--trials", type=int, default=8, help="overhead: trials per sweep (default: 8)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="overhead: runs of each variant (default: 1)"
    )
    parser.add_argument("--epochs", type=int, default=9, help="search: epochs (default: 9)")
    parser.add_argument(
        "--num-images", type=int, default=500, help="search: training images (default: 500)"
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="search: comma-separated seeds (default: 0,1,2)"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"invalid --repeat {args.repeat}: must be at least 1")
    print(f"machine: {machine()}")
    if args.figure == "parts":
        figures = parts()
        if args.json:
            print(json.dumps(figures))
        return 0
    ensure_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as folder:
        storage = args.storage or Path(folder)
        if args.figure == "overhead":
            variants = args.variants.split(",")
            figures = overhead(storage, variants, args.trials, 20, args.repeat)
        else:
            seeds = [int(v) for v in args.seeds.split(",")]
            figures = search(storage, args.epochs, args.num_images, seeds)
    if args.json:
        print(json.dumps(figures))
    return 0


def all_results(experiment: Path) -> list[dict]:
    """Return every result of every trial, ordered by the time the trial reported it.

    Tune's own "timestamp" has whole seconds, so a result's time is taken as the trial's
    start (the modification time of its params.json, written when the trial starts) plus
    the result's time_total_s.
    """
    results = []
    for path in experiment.glob("trial_*/result.json"):
        start = (path.parent / "params.json").stat().st_mtime
        for line in path.read_text().splitlines():
            if line:
                result = json.loads(line)
                result["reported_at"] = start + result["time_total_s"]
                results.append(result)
    return sorted(results, key=lambda result: result["reported_at"])


# --- overhead ---------------------------------------------------------------------------

# The parts of the rest, in the order printed. The first four are the trainable's own
# timers, the seconds it reports with each result (glo_search.trainable.TIMERS). The
# others come from the times when the driver saw each trial start and complete (Timeline).
PARTS = {
    "setup_time_s": "trainer setup (data, trainer, TensorBoard log)",
    "log_time_s": "TensorBoard writes",
    "checkpoint_time_s": "checkpoint torch.save",
    "report_time_s": "tune.report (checkpoint copy, artifact sync, wait for Tune)",
    "in_trial_other": "rest of the trial's time in Tune (reset, last report, stop)",
    "sweep_start": "sweep start to each slot's first trial (Tune setup, worker start)",
    "between_trials": "between a trial's end and the next start in its slot",
    "sweep_end": "idle slot at the end and the sweep's return",
}


class Timeline(tune.Callback):
    """Record in the driver when each trial starts, reports and completes."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.trials: dict[str, dict] = {}

    def _now(self) -> float:
        return time.perf_counter() - self.started

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.trials[trial.trial_id] = {"start": self._now(), "results": []}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        entry = self.trials[trial.trial_id]
        entry["results"].append((self._now(), result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.trials[trial.trial_id]["complete"] = self._now()


def parse_variant(variant: str) -> dict:
    """Read a variant name: SCHEDULER[-eN][-new][-warm], e.g. fifo, asha-e5, fifo-new.

    Without -eN the sweep's own default applies (glo_search.search.default_eval_every):
    metrics every epoch with FIFO, at the rungs and the last epoch with ASHA. With -warm,
    warm_up() runs before the timer starts.
    """
    parts = variant.split("-")
    if parts[0] not in ("fifo", "asha"):
        raise SystemExit(f"invalid variant {variant!r}: must start with fifo or asha")
    settings = {"scheduler": parts[0], "eval_every": None, "reuse": True, "warm": False}
    for part in parts[1:]:
        if part == "new":
            settings["reuse"] = False
        elif part == "warm":
            settings["warm"] = True
        elif part.startswith("e") and part[1:].isdigit():
            settings["eval_every"] = int(part[1:])
        else:
            raise SystemExit(f"invalid variant {variant!r}: unknown part {part!r}")
    return settings


def overhead(
    storage: Path, variants: list[str], trials: int, epochs: int, repeat: int = 1
) -> dict:
    # A sweep trains the reference classifier when its cache is empty, which took 20-51 s
    # on 2 cores. A user pays that once, so it stays outside the timers.
    classifier.load_info()
    figures = {}
    runs = [variant for variant in variants for _ in range(repeat)]
    done = Counter()
    for number, variant in enumerate(runs):
        settings = parse_variant(variant)
        name = f"overhead-{variant}-{number}"
        # FIFO runs every trial to max_epochs; ASHA (grace period 2, reduction factor 3,
        # the sweep's defaults) stops some early.
        scheduler = make_scheduler("fifo", epochs) if settings["scheduler"] == "fifo" else None
        if settings["warm"]:
            warm_up()
        timeline = Timeline()
        sweep(
            "default",
            num_samples=trials,
            max_epochs=epochs,
            max_concurrent=2,
            cpus_per_trial=1,
            base_config={}
            if settings["eval_every"] is None
            else {"eval_every": settings["eval_every"]},
            scheduler=scheduler,
            storage=storage,
            name=name,
            verbose=0,
            reuse_actors=settings["reuse"],
            callbacks=[timeline],
        )
        wall = time.perf_counter() - timeline.started
        done[variant] += 1
        key = variant if runs.count(variant) == 1 else f"{variant} #{done[variant]}"
        figures[key] = _overhead_figures(timeline, wall)
    _print_overhead(figures)
    return figures


def warm_up(wait_s: float = WARM_WAIT_S) -> None:
    """Start 2 Ray workers for the next sweep and prepare Optuna's study storage, then wait.

    The workers import torch and the trainer at start when Ray was started by glo-search
    (glo_search.warm), which takes 3-5 s on 2 cores.
    """
    configure_tune_environment()  # sets variables that Tune passes to the trials' workers
    if warm_workers(2) != 2:
        raise SystemExit(
            "warm variant: the raylet's PrestartWorkers call failed. Run with the "
            "glo_search.warm logger at DEBUG level to see the error"
        )
    _start_study_preparation().join()
    time.sleep(wait_s)


def _overhead_figures(timeline: Timeline, wall: float) -> dict:
    """Split 2 slots x wall time into training, metrics and the parts of the rest.

    A trial's time in Tune runs from on_trial_start (its worker ready) to
    on_trial_complete. Time outside every trial is split by slot, taking the first two
    trials to start as the slots' first and the last two to complete as their last.
    """
    slots = 2 * wall
    totals = dict.fromkeys(["train", "eval", *PARTS], 0.0)
    trial_epochs = reports = checkpoints = 0
    entries = list(timeline.trials.values())
    for entry in entries:
        last = entry["results"][-1][1]
        trial_epochs += last["epoch"]
        reports += len(entry["results"])
        checkpoints += sum(
            bool(result.get("checkpoint_dir_name")) for _, result in entry["results"]
        )
        totals["train"] += last["train_time_s"]
        totals["eval"] += last["eval_time_s"]
        inside = entry["complete"] - entry["start"] - last["train_time_s"] - last["eval_time_s"]
        for key in PARTS:
            if key.endswith("_time_s"):
                totals[key] += last.get(key, 0.0)
                inside -= last.get(key, 0.0)
        totals["in_trial_other"] += inside
    starts = sorted(entry["start"] for entry in entries)
    completes = sorted(entry["complete"] for entry in entries)
    totals["sweep_start"] = sum(starts[:2])
    totals["sweep_end"] = sum(wall - complete for complete in completes[-2:])
    in_trials = sum(entry["complete"] - entry["start"] for entry in entries)
    totals["between_trials"] = slots - in_trials - totals["sweep_start"] - totals["sweep_end"]
    count = len(entries)
    rest = slots - totals["train"] - totals["eval"]
    return {
        "trials": count,
        "reports": reports,
        "checkpoints": checkpoints,
        "trial_epochs": trial_epochs,
        "wall_s": wall,
        "train_share": totals["train"] / slots,
        "eval_share": totals["eval"] / slots,
        "rest_share": rest / slots,
        "rest_s_per_trial": rest / count,
        "parts_s_per_trial": {key: totals[key] / count for key in PARTS},
        "first_starts_s": starts[:2],
        "idle_at_end_s": completes[-1] - completes[-2],
    }


def _print_overhead(figures: dict) -> None:
    print(
        "| variant | trials | trial-epochs | reports | checkpoints | wall | training | metrics "
        "| the rest | rest per trial |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, f in figures.items():
        print(
            f"| {variant} | {f['trials']} | {f['trial_epochs']} | {f['reports']} | "
            f"{f['checkpoints']} | "
            f"{f['wall_s']:.1f} s | {f['train_share']:.3f} | {f['eval_share']:.3f} | "
            f"{f['rest_share']:.3f} | {f['rest_s_per_trial']:.2f} s |"
        )
    print("\nthe rest in seconds per trial (slot-seconds over the trials):\n")
    print("| part | " + " | ".join(figures) + " |")
    print("| --- |" + " --- |" * len(figures))
    for key, label in PARTS.items():
        cells = " | ".join(f"{f['parts_s_per_trial'][key]:.2f}" for f in figures.values())
        print(f"| {label} | {cells} |")
    for variant, f in figures.items():
        first, second = f["first_starts_s"]
        print(
            f"{variant}: the first two trials started {first:.2f} s and {second:.2f} s "
            f"after the sweep call; one slot was idle for the last {f['idle_at_end_s']:.2f} s"
        )


# --- parts ------------------------------------------------------------------------------


def parts() -> dict:
    import statistics

    import torch

    from glo_search import trainable
    from glo_search import trainer as trainer_module
    from glo_search.config import TrainConfig
    from glo_search.data import DatasetCache, load_dataset
    from glo_search.trainer import Trainer

    torch.set_num_threads(1)
    state = classifier.load_state()
    config = TrainConfig(epochs=20)
    Trainer(config, trainable._dataset(config), state, device="cpu")  # imports, caches

    def fresh() -> None:
        # The new dataset gets an empty cache, so its entry never evicts the worker's.
        worker_cache = trainer_module._SWAP_CACHE
        trainer_module._SWAP_CACHE = DatasetCache()
        try:
            Trainer(config, load_dataset(config), state, device="cpu")
        finally:
            trainer_module._SWAP_CACHE = worker_cache

    def cached() -> None:
        Trainer(config, trainable._dataset(config), state, device="cpu")

    setup = interleaved({"data and swaps again": fresh, "cached": cached}, rounds=15)
    figures = {f"trainer setup, {k}": statistics.median(v) for k, v in setup.items()}
    figures.update(_optuna_per_result(config))
    for name, seconds in figures.items():
        print(f"{name}: {1000 * seconds:.1f} ms")
    return figures


def _optuna_per_result(config) -> dict:
    """Time, per result of 8 trials x 20 epochs, a read of the trial from the study and
    the searcher's on_trial_result."""
    import statistics

    from glo_search.search import make_searcher
    from glo_search.spaces import resolve
    from glo_search.storage import sqlite_url

    times: dict[str, list[float]] = {"study read per result": [], "on_trial_result": []}
    with tempfile.TemporaryDirectory() as folder:
        url = sqlite_url(Path(folder) / "optuna.db")
        searcher = make_searcher(resolve("default", config), METRIC, "max", url, "parts", 20)
        for number in range(8):
            trial_id = f"trial{number}"
            searcher.suggest(trial_id)
            ot_trial = searcher._ot_trials[trial_id]
            for epoch in range(1, 21):
                started = time.perf_counter()
                ot_trial.storage.get_trial(ot_trial._trial_id)
                read = time.perf_counter()
                searcher.on_trial_result(trial_id, {METRIC: 0.01 * epoch, "epoch": epoch})
                times["study read per result"].append(read - started)
                times["on_trial_result"].append(time.perf_counter() - read)
            searcher.on_trial_complete(trial_id, {METRIC: 0.2, "epoch": 20})
    return {name: statistics.median(values) for name, values in times.items()}


# --- search efficiency ------------------------------------------------------------------


def search(storage: Path, epochs: int, num_images: int, seeds: list[int]) -> dict:
    # Every epoch reports, so that one result is one trial-epoch in the counts below.
    base = {"num_images": num_images, "swap_sources": 100, "seed": 0, "eval_every": 1}
    space = {key: CategoricalDistribution(values) for key, values in SEARCH_SPACE.items()}
    grid_size = math.prod(len(values) for values in SEARCH_SPACE.values())
    print(
        f"budget: {grid_size} configurations, {num_images} images, {epochs} epochs, "
        f"swap_sources 100, ASHA grace period 1 and reduction factor 3"
    )
    # Training is deterministic, so the grid runs once; each seed replays it in its own order.
    runs: dict[str, dict[int, list[dict]]] = {"tpe+asha": {}, "random+asha": {}}
    grid = _search_results("grid", 0, space, grid_size, epochs, base, storage)
    for seed in seeds:
        for method in runs:
            runs[method][seed] = _search_results(
                method, seed, space, grid_size, epochs, base, storage
            )
    return _summarize(grid, runs, seeds)


def _search_results(method, seed, space, grid_size, epochs, base, storage) -> list[dict]:
    """Run one search, or reuse its folder under --storage when a finished run is there."""
    name = f"search-{method}-{seed}"
    if (storage / name / "trials.parquet").is_file():
        print(f"{name}: reusing {storage / name}")
    else:
        started = time.perf_counter()
        _run_search(method, seed, space, grid_size, epochs, base, storage, name)
        print(f"{name}: {time.perf_counter() - started:.0f} s")
    return all_results(storage / name)


def _run_search(method, seed, space, grid_size, epochs, base, storage, name) -> None:
    common = {
        "num_samples": grid_size,
        "max_epochs": epochs,
        "max_concurrent": 2,
        "base_config": base,
        "storage": storage,
        "name": name,
        "seed": seed,
        "verbose": 0,
        "reuse_actors": True,  # saves a worker start per trial; TensorBoard logs unused here
    }
    if method == "grid":
        searcher = OptunaSearch(
            space=space,
            metric=METRIC,
            mode="max",
            sampler=optuna.samplers.GridSampler(
                {key: d.choices for key, d in space.items()}, seed=seed
            ),
        )
        sweep(None, search_alg=searcher, scheduler=make_scheduler("fifo", epochs), **common)
        return
    sampler = "tpe" if method == "tpe+asha" else "random"
    sweep(space, sampler=sampler, grace_period=1, reduction_factor=3, **common)


def _summarize(grid: list[dict], runs: dict[str, dict[int, list[dict]]], seeds) -> dict:
    best = max(result[METRIC] for result in grid)
    figures: dict = {"grid_best": best}
    for fraction in FRACTIONS:
        target = fraction * best
        print(f"target: {fraction:.0%} of the grid's best {METRIC} {best:.4f} = {target:.4f}")
        rows = {"grid": [_grid_replay(grid, target, seed) | {"seed": seed} for seed in seeds]}
        for method, by_seed in runs.items():
            rows[method] = [
                _first_reach(results, target) | {"seed": s} for s, results in by_seed.items()
            ]
        for method, method_rows in rows.items():
            cells = ", ".join(
                f"seed {row['seed']}: {row['to_target'] or 'not reached'} of {row['total']}"
                + (f" (best {row['best']:.4f})" if "best" in row else "")
                for row in method_rows
            )
            print(f"  {method:12s} trial-epochs to the target: {cells}")
        figures[f"{fraction:g}"] = rows
    return figures


def _first_reach(results: list[dict], target: float) -> dict:
    reached = next((i + 1 for i, r in enumerate(results) if r[METRIC] >= target - 1e-12), None)
    best = max(r[METRIC] for r in results)
    return {"to_target": reached, "total": len(results), "best": best}


def _grid_replay(grid: list[dict], target: float, seed: int) -> dict:
    """Count the trial-epochs a grid run in a seeded random order trains to the target.

    Trials are taken one after another, each to its last epoch, as a grid without early
    stopping runs them. Returns the trial-epochs to the target and in all.
    """
    trials: dict[str, list[dict]] = {}
    for result in grid:
        trials.setdefault(result["trial_id"], []).append(result)
    order = sorted(trials)
    random.Random(seed).shuffle(order)
    count, reached = 0, None
    for trial_id in order:
        for result in sorted(trials[trial_id], key=lambda r: r["epoch"]):
            count += 1
            if reached is None and result[METRIC] >= target - 1e-12:
                reached = count
    return {"to_target": reached, "total": count}


if __name__ == "__main__":
    raise SystemExit(main())
