"""Sweep figures: where a sweep's wall time goes, and how fast each searcher finds the best.

    python benchmarks/sweep_speed.py overhead   # 8 trials x 20 epochs, 2 at once
    python benchmarks/sweep_speed.py search     # Optuna+ASHA, random+ASHA, grid; 3 seeds

Both start Ray in this process with --cpus CPUs (default 2) and write experiment folders
under --storage (default: a temporary folder, deleted at the end).

overhead: the share of the sweep's wall time (from Tuner.fit's start, Ray already
running) that trainers spend in train_epoch, summed over trials and divided by the trials
that run at once. Each trial reports its own seconds in train_epoch and evaluate with
every result (train_time_s, eval_time_s), which Tune writes to the trial's result.json.

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
from pathlib import Path

import optuna
from common import machine
from optuna.distributions import CategoricalDistribution
from ray.tune.search.optuna import OptunaSearch

from glo_search.search import ensure_ray, make_scheduler, sweep

SEARCH_SPACE = {
    "class_dim": [5, 15, 50],
    "content_dim": [10, 50],
    "noise_std": [0.0001, 0.3, 5.0, 100.0],
    "content_decay": [0.0, 0.1],
}  # 3 x 2 x 4 x 2 = 48 configurations, a subset of the `report` space's choices
METRIC = "disentanglement"
FRACTIONS = (1.0, 0.95)  # targets: the grid's best, and 95% of it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["overhead", "search"])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (default: 2)")
    parser.add_argument("--storage", type=Path, default=None, help="keep experiments here")
    parser.add_argument(
        "--variants",
        default="1,1-reuse,20,20-reuse",
        help="overhead: comma-separated eval_every values to run, '-reuse' to run trials "
        "in reused Ray workers (reuse_actors) (default: 1,1-reuse,20,20-reuse)",
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
    print(f"machine: {machine()}")
    ensure_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as folder:
        storage = args.storage or Path(folder)
        if args.figure == "overhead":
            figures = overhead(storage, args.variants.split(","))
        else:
            seeds = [int(v) for v in args.seeds.split(",")]
            figures = search(storage, args.epochs, args.num_images, seeds)
    if args.json:
        print(json.dumps(figures))
    return 0


def last_results(experiment: Path) -> list[dict]:
    """Return each trial's last result from Tune's result.json files."""
    results = []
    for path in sorted(experiment.glob("trial_*/result.json")):
        lines = path.read_text().strip().splitlines()
        if lines:
            results.append(json.loads(lines[-1]))
    return results


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


def overhead(storage: Path, variants: list[str]) -> dict:
    figures = {}
    for variant in variants:
        eval_every = int(variant.removesuffix("-reuse"))
        reuse = variant.endswith("-reuse")
        name = f"overhead-{variant}"
        started = time.perf_counter()
        sweep(
            "default",
            num_samples=8,
            max_epochs=20,
            max_concurrent=2,
            cpus_per_trial=1,
            base_config={"eval_every": eval_every},
            storage=storage,
            name=name,
            verbose=0,
            reuse_actors=reuse,
        )
        wall = time.perf_counter() - started
        results = last_results(storage / name)
        train = sum(r["train_time_s"] for r in results)
        evaluate = sum(r["eval_time_s"] for r in results)
        epochs = sum(r["epoch"] for r in results)
        train_share = train / (2 * wall)
        eval_share = evaluate / (2 * wall)
        print(
            f"eval_every={eval_every}, {'reused' if reuse else 'a new'} Ray worker per "
            f"trial: {len(results)} trials, {epochs} trial-epochs, "
            f"wall {wall:.1f} s; per running slot: training {train_share:.2f}, metrics "
            f"{eval_share:.2f}, the rest (Ray, Optuna, checkpoints, files, idle) "
            f"{1 - train_share - eval_share:.2f}"
        )
        figures[variant] = {
            "wall_s": wall,
            "train_s": train,
            "eval_s": evaluate,
            "trial_epochs": epochs,
            "train_share": train_share,
            "eval_share": eval_share,
        }
    return figures


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
