"""Re-run the hand-tuned study of this model and test each of its claims with numbers.

The study varies one hyperparameter at a time around the reference setting (class_dim 5,
content_dim 25, noise_std 0.3, content_decay 0, loss l1+l2, 2,000 shipped digits) over
several seeds. Each experiment is an ordinary sweep: a grid over the varied value and the
seed, run without early stopping, so that every trial's whole learning curve is recorded.
``glo_search.findings`` turns the folders into FINDINGS.md and a report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from glo_search import classifier as digit_classifier
from glo_search import metrics as m
from glo_search.probes import load_for_probes
from glo_search.results import TRIALS_FILE, write_table
from glo_search.trainer import Trainer

logger = logging.getLogger(__name__)

REFERENCE = {
    "class_dim": 5,
    "content_dim": 25,
    "noise_std": 0.3,
    "content_decay": 0.0,
    "loss": "l1+l2",
}
MEASURES_FILE = "measures.parquet"
METRIC = "disentanglement"


@dataclass(frozen=True)
class Experiment:
    """One hyperparameter varied over values around the reference setting."""

    name: str
    key: str
    values: tuple[Any, ...]
    long: bool = False  # trained for the plan's long_epochs (the content_decay claims)


EXPERIMENTS = (
    Experiment("loss", "loss", ("l1", "l2", "l1+l2")),
    Experiment("class_dim", "class_dim", (5, 10, 15, 25, 50)),
    Experiment("content_dim", "content_dim", (10, 25, 50, 75, 100)),
    Experiment("noise_std", "noise_std", (0.0001, 0.3, 5.0, 10.0, 100.0)),
    Experiment("content_decay", "content_decay", (0.0, 0.1, 0.5, 1.0), long=True),
)


@dataclass(frozen=True)
class Plan:
    """Budget of a study run."""

    name: str
    seeds: tuple[int, ...]
    num_images: int
    epochs: int
    long_epochs: int  # the hand study judged content_decay after about 100 epochs
    swap_sources: int


FULL = Plan("full", (0, 1, 2), 2000, 50, 100, 300)
QUICK = Plan("quick", (0, 1, 2), 500, 8, 16, 100)
PLANS = {plan.name: plan for plan in (FULL, QUICK)}


def run_experiment(experiment: Experiment, plan: Plan, out: Path) -> Path:
    """Run (or finish) one experiment's grid through glo_search.search.sweep."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from glo_search.resume import resume
    from glo_search.search import make_scheduler, sweep

    folder = out / experiment.name
    expected = len(experiment.values) * len(plan.seeds)
    space = {
        experiment.key: tune.grid_search(list(experiment.values)),
        "seed": tune.grid_search(list(plan.seeds)),
    }
    if _finished_trials(folder) >= expected:
        logger.info("study: %s already has its %d trials; skipping it", experiment.name, expected)
        return folder
    if folder.exists() and any(folder.iterdir()):
        logger.info("study: continuing the interrupted experiment %s", experiment.name)
        resume(folder, space=space)
        return folder
    base = {k: v for k, v in REFERENCE.items() if k != experiment.key}
    # Every epoch is evaluated: the findings read whole learning curves.
    base.update(num_images=plan.num_images, swap_sources=plan.swap_sources, eval_every=1)
    logger.info("study: running %s, %d trials", experiment.name, expected)
    epochs = plan.long_epochs if experiment.long else plan.epochs
    sweep(
        space,
        metric=METRIC,
        num_samples=1,
        max_epochs=epochs,
        base_config=base,
        scheduler=make_scheduler("fifo", epochs),
        search_alg=BasicVariantGenerator(),
        storage=out,
        name=experiment.name,
        verbose=0,
    )
    return folder


def _warm_next(experiment: Experiment, plan: Plan, out: Path) -> None:
    """Start Ray workers for the next experiment's trials, one CPU each as its sweep requests."""
    import ray

    from glo_search.search import local_trial_slots
    from glo_search.warm import warm_workers

    trials = len(experiment.values) * len(plan.seeds)
    if ray.is_initialized() and _finished_trials(out / experiment.name) < trials:
        warm_workers(local_trial_slots(1, 0, trials, None))


def _finished_trials(folder: Path) -> int:
    path = folder / TRIALS_FILE
    if not path.is_file():
        return 0
    trials = pd.read_parquet(path)
    return int(trials["status"].isin(["completed", "stopped", "diverged"]).sum())


@torch.no_grad()
def measure_trial(checkpoint: Path, classifier_state: dict) -> dict[str, float]:
    """Measure what the metrics average away, from a trial's best checkpoint.

    Returns the style transfer of each attribute, the share of cross-class swaps that the
    classifier labels as the content image's own digit, how many distinct outputs the
    swaps produce, and how sharp and how coarse-accurate the reconstructions are.
    """
    trainer = load_for_probes(checkpoint)
    judge = digit_classifier.build(classifier_state)
    swaps = trainer.swaps
    outputs = trainer.generate(
        trainer.codes.classes[swaps.targets], trainer.codes.content[swaps.sources]
    )  # (M, 1, 28, 28)
    source_attributes = m.style_attributes(trainer.dataset.images[swaps.sources])
    output_attributes = m.style_attributes(outputs)
    measures = {
        f"transfer_{name}": m.style_transfer(
            source_attributes[:, j : j + 1], output_attributes[:, j : j + 1], swaps.targets
        )
        for j, name in enumerate(m.STYLE_ATTRIBUTES)
    }
    predicted = digit_classifier.predict(judge, outputs)
    source_labels = trainer.dataset.labels[swaps.sources]
    measures["source_digit_rate"] = (predicted == source_labels).double().mean().item()
    measures["distinct_outputs"] = float(count_distinct(outputs))
    measures.update(_reconstruction_measures(trainer))
    return measures


def count_distinct(images: torch.Tensor, tolerance: float = 0.02, sample: int = 500) -> int:
    """Count groups of near-identical images among the first ``sample`` images.

    Two images are one group when their mean absolute pixel difference is below
    ``tolerance`` (2% of the intensity range by default). A generator that ignores content
    gives one group per class.
    """
    flat = images[:sample].flatten(1)  # (S, 784)
    leaders: list[torch.Tensor] = []
    for image in flat:
        if leaders:
            distances = (torch.stack(leaders) - image).abs().mean(dim=1)
            if distances.min().item() < tolerance:
                continue
        leaders.append(image)
    return len(leaders)


def _reconstruction_measures(trainer: Trainer) -> dict[str, float]:
    """Sharpness (output edge strength over the target's) and error of 4x4 block means."""
    outputs = trainer.reconstruct()
    targets = trainer.images
    sharpness = _edge_strength(outputs) / _edge_strength(targets)
    pooled = torch.nn.functional.avg_pool2d
    coarse = torch.nn.functional.mse_loss(pooled(outputs, 4), pooled(targets, 4)).item()
    return {"sharpness": sharpness, "coarse_error": coarse}


def _edge_strength(images: torch.Tensor) -> float:
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return (dx.abs().mean() + dy.abs().mean()).item()


def measure_experiment(folder: Path, classifier_state: dict) -> pd.DataFrame:
    """Measure every trial's best checkpoint once and keep the table in measures.parquet."""
    path = folder / MEASURES_FILE
    trials = pd.read_parquet(folder / TRIALS_FILE)
    if path.is_file():
        cached = pd.read_parquet(path)
        if set(cached["trial_id"]) == set(trials["trial_id"]):
            return cached
    rows = []
    for _, trial in trials.iterrows():
        if not isinstance(trial["checkpoint_path"], str):
            logger.warning("study: trial %s has no checkpoint; not measured", trial["trial_id"])
            continue
        measures = measure_trial(folder / trial["checkpoint_path"], classifier_state)
        rows.append({"trial_id": trial["trial_id"], **measures})
    write_table(rows, path)
    return pd.DataFrame(rows)


def run_study(
    out: str | Path, plan: Plan = FULL, experiments: tuple[Experiment, ...] = EXPERIMENTS
) -> dict[str, Path]:
    """Run the study's experiments into ``out`` and measure their trials.

    An interrupted study continues where it stopped when run again with the same ``out``.
    Returns the experiment folders by name.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    classifier_state = digit_classifier.load_state()
    folders = {}
    started = time.monotonic()
    for number, experiment in enumerate(experiments, start=1):
        logger.info("study: experiment %d/%d (%s)", number, len(experiments), experiment.name)
        folders[experiment.name] = run_experiment(experiment, plan, out)
        if number < len(experiments):
            _warm_next(experiments[number], plan, out)  # they start while this one is measured
        measure_experiment(folders[experiment.name], classifier_state)
        logger.info("study: %.0f s so far", time.monotonic() - started)
    return folders


def seed_summary(values: pd.Series) -> tuple[float, float, int]:
    """Mean, standard deviation (0 for one value) and count of per-seed values."""
    array = np.asarray(values.dropna(), dtype=float)
    if len(array) == 0:
        return float("nan"), float("nan"), 0
    spread = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), spread, len(array)
