"""Sweeps: Ray Tune runs the trainable, Optuna proposes configurations, ASHA stops early.

The defaults pair a model-based searcher with successive halving. Optuna's TPE sampler
(Bergstra et al., NeurIPS 2011) proposes configurations. ASHA (Li et al., "A System for
Massively Parallel Hyperparameter Tuning", MLSys 2020) checks each trial at rungs of
grace_period * reduction_factor**k epochs and stops it when its metric falls below the
top 1/reduction_factor of the trials that reached that rung before.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    TrialScheduler,
)
from ray.tune.search import SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from glo_search import classifier
from glo_search.config import ConfigError, TrainConfig, from_dict
from glo_search.io import atomic_write_text
from glo_search.metrics import metric_mode
from glo_search.results import ResultsWriter
from glo_search.spaces import ResolvedSpace, resolve
from glo_search.trainable import train_glo

logger = logging.getLogger(__name__)

SCHEDULERS = ("asha", "hyperband", "median", "fifo")
SAMPLERS = ("tpe", "random")
EXPERIMENT_FILE = "experiment.json"
STUDY_FILE = "optuna.db"


def make_scheduler(
    name: str, max_epochs: int, grace_period: int | None = None, reduction_factor: float = 3
) -> TrialScheduler:
    """Build a scheduler by name; one unit of time is one epoch.

    Args:
        name: one of ``asha``, ``hyperband``, ``median`` or ``fifo``.
        max_epochs: the last rung (ASHA's and HyperBand's ``max_t``, R in the papers).
        grace_period: epochs before the first rung (ASHA's minimum resource r); default
            2, or max_epochs when that is smaller.
        reduction_factor: eta: each rung keeps the best 1/eta of the trials.
    """
    grace_period = _check_schedule(max_epochs, grace_period, reduction_factor)
    if name == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
    if name == "hyperband":
        return HyperBandScheduler(
            time_attr="epoch", max_t=max_epochs, reduction_factor=reduction_factor
        )
    if name == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=grace_period)
    if name == "fifo":
        return FIFOScheduler()
    raise ConfigError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")


def _check_schedule(max_epochs: int, grace_period: int | None, reduction_factor: float) -> int:
    """Return the grace period after checking the schedule's numbers against each other."""
    if max_epochs < 1:
        raise ConfigError(f"invalid max_epochs={max_epochs} (--max-epochs): must be >= 1")
    if reduction_factor <= 1:
        raise ConfigError(
            f"invalid reduction_factor={reduction_factor} (--reduction-factor): must be > 1"
        )
    if grace_period is None:
        return min(2, max_epochs)
    if not 1 <= grace_period <= max_epochs:
        raise ConfigError(
            f"invalid grace_period={grace_period} (--grace-period): must be between 1 and "
            f"max_epochs={max_epochs}"
        )
    return grace_period


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


def study_storage(experiment_dir: Path) -> optuna.storages.RDBStorage:
    """Open the Optuna study's SQLite storage inside the experiment folder."""
    return optuna.storages.RDBStorage(f"sqlite:///{experiment_dir / STUDY_FILE}")


def make_searcher(
    space: ResolvedSpace,
    metric: str,
    mode: str,
    experiment_dir: Path,
    study_name: str,
    sampler: str = "tpe",
    seed: int = 0,
) -> OptunaSearch:
    """OptunaSearch over the space, with the study stored in the experiment folder."""
    searcher_space = None if space.kind == "ray" else space.space
    return OptunaSearch(
        space=searcher_space,
        metric=metric,
        mode=mode,
        sampler=make_sampler(sampler, seed),
        storage=study_storage(experiment_dir),
        study_name=study_name,
    )


def _base_config(base_config: TrainConfig | dict | None, max_epochs: int) -> TrainConfig:
    if isinstance(base_config, TrainConfig):
        base_config = base_config.to_dict()
    return from_dict({**(base_config or {}), "epochs": max_epochs})


def _check_overlap(space: ResolvedSpace, fixed: dict | None) -> None:
    overlap = sorted(space.keys & set(fixed or {}))
    if overlap:
        raise ConfigError(
            f"{overlap[0]} is set both as a fixed value and by search space "
            f"{space.name!r}; drop the fixed value or use a space without {overlap[0]}"
        )


def _experiment_dir(storage: str | Path, name: str) -> Path:
    experiment_dir = Path(storage).expanduser().resolve() / name
    if experiment_dir.exists() and any(experiment_dir.iterdir()):
        raise ConfigError(
            f"experiment folder {experiment_dir} already exists and is not empty; "
            f"choose another --name, or continue it with: glo-search resume {experiment_dir}"
        )
    return experiment_dir


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster at address, or start Ray in this process (dashboard off).

    Without an address Ray starts locally even when `ray start` left a cluster running,
    which ray.init() would join by default.
    """
    if ray.is_initialized():
        return
    ray.init(
        address=address or "local",
        num_cpus=None if address else num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )


def sweep(
    space: str | dict | Callable | None = "default",
    *,
    metric: str = "disentanglement",
    num_samples: int = 16,
    max_epochs: int = 20,
    base_config: TrainConfig | dict | None = None,
    scheduler: TrialScheduler | None = None,
    search_alg: Searcher | SearchAlgorithm | None = None,
    sampler: str = "tpe",
    storage: str | Path = "glo-runs",
    name: str | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    seed: int = 0,
    grace_period: int | None = None,
    reduction_factor: float = 3,
    address: str | None = None,
    verbose: int = 1,
) -> tune.ResultGrid:
    """Run a hyperparameter sweep of the GLO trainer and return Ray Tune's ResultGrid.

    Args:
        space: a search space name from ``search_spaces``, a path to a .py file defining
            ``SPACE``, an Optuna define-by-run function, or a dict of Optuna
            distributions or Ray Tune domains keyed by TrainConfig field. May be None
            when ``search_alg`` carries its own space.
        metric: the metric that the searcher optimizes, the scheduler stops on and
            checkpoints are kept by; its direction comes from ``glo_search.metrics``.
        base_config: fixed TrainConfig values for every trial (a TrainConfig or a dict
            of overrides); keys the space varies must not appear here.
        scheduler: any Ray Tune TrialScheduler, created without metric and mode (the
            sweep sets them). Default: ASHA with ``grace_period`` and
            ``reduction_factor``, one unit of time per epoch.
        search_alg: any Ray Tune searcher. Default: OptunaSearch with ``sampler``
            ("tpe" or "random", seeded by ``seed``) and the study in
            ``<experiment>/optuna.db``. A custom searcher needs a space given as a dict
            of Ray Tune domains, or a space of its own.
        storage: folder (or pyarrow URI) under which the experiment folder ``name``
            is created.
        max_concurrent: trials running at once; default: as many as resources allow.
        cpus_per_trial, gpus_per_trial: resources of each trial (fractions allowed).
        address: a Ray cluster address; default: start Ray in this process.
    """
    mode = _check_metric(metric)
    fixed = base_config.to_dict() if isinstance(base_config, TrainConfig) else base_config
    base = _base_config(base_config, max_epochs)
    resolved = _resolve_space(space, base, search_alg)
    if resolved is not None and isinstance(base_config, dict):
        _check_overlap(resolved, fixed)
    _check_resources(cpus_per_trial, gpus_per_trial, num_samples, max_concurrent)
    name = name or f"{resolved.name if resolved else 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_dir = _experiment_dir(storage, name)

    classifier_state = classifier.load_state()
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if search_alg is None:
        search_alg = make_searcher(resolved, metric, mode, experiment_dir, name, sampler, seed)
    scheduler = scheduler or make_scheduler("asha", max_epochs, grace_period, reduction_factor)
    _write_experiment_file(
        experiment_dir,
        {
            "name": name,
            "metric": metric,
            "mode": mode,
            "space": resolved.name if resolved else None,
            "num_samples": num_samples,
            "max_epochs": max_epochs,
            "seed": seed,
            "sampler": sampler,
            "scheduler": type(scheduler).__name__,
            "base_config": base.to_dict(),
            "classifier": asdict(classifier.load_info()),
            "cpus_per_trial": cpus_per_trial,
            "gpus_per_trial": gpus_per_trial,
            **scheduler_settings(scheduler),
        },
    )

    ensure_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(
            train_glo, base=base.to_dict(), classifier_state=classifier_state, metric=metric
        ),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=resolved.space if resolved is not None and resolved.kind == "ray" else {},
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=trial_dirname,
            **_tune_metric(scheduler, metric, mode),
        ),
        run_config=_run_config(experiment_dir, base.to_dict(), metric, mode, max_epochs, verbose),
    )
    return tuner.fit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _check_metric(metric: str) -> str:
    try:
        return metric_mode(metric)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _resolve_space(space, base: TrainConfig, search_alg) -> ResolvedSpace | None:
    if space is None:
        if search_alg is None:
            raise ConfigError("no search space given; pass a space name, dict or function")
        return None
    resolved = resolve(space, base)
    if search_alg is not None and resolved.kind != "ray":
        raise ConfigError(
            f"search space {resolved.name!r} is an Optuna space, which only the default "
            "OptunaSearch reads; with a custom search_alg pass a dict of Ray Tune domains "
            "or give the searcher its own space and space=None"
        )
    return resolved


def _check_resources(cpus: float, gpus: float, num_samples: int, max_concurrent) -> None:
    if cpus <= 0:
        raise ConfigError(f"invalid cpus_per_trial={cpus} (--cpus-per-trial): must be > 0")
    if gpus < 0:
        raise ConfigError(f"invalid gpus_per_trial={gpus} (--gpus-per-trial): must be >= 0")
    if num_samples < 1:
        raise ConfigError(f"invalid num_samples={num_samples} (--num-samples): must be >= 1")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(
            f"invalid max_concurrent={max_concurrent} (--max-concurrent): must be >= 1"
        )


def _tune_metric(scheduler: TrialScheduler, metric: str, mode: str) -> dict[str, str]:
    """Give TuneConfig the metric unless the scheduler was built with its own."""
    own = getattr(scheduler, "_metric", None)
    if own is None:
        return {"metric": metric, "mode": mode}
    if own != metric:
        raise ConfigError(
            f"the scheduler was built with metric {own!r} but the sweep's metric is "
            f"{metric!r}; build the scheduler without metric and mode"
        )
    return {}


def _run_config(
    experiment_dir: Path,
    base: dict,
    metric: str,
    mode: str,
    max_epochs: int,
    verbose: int,
) -> tune.RunConfig:
    # Ray's automatic TensorBoard logger would duplicate the trainable's own event files.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Keeping only the best checkpoint makes Tune snapshot its state at every checkpoint
    # and warn each time. The snapshot is small, so the warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return tune.RunConfig(
        name=experiment_dir.name,
        storage_path=str(experiment_dir.parent),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        callbacks=[
            JsonLoggerCallback(),
            CSVLoggerCallback(),
            ResultsWriter(experiment_dir, base, metric, mode, max_epochs),
        ],
        verbose=verbose,
    )


def scheduler_settings(scheduler: TrialScheduler) -> dict[str, Any]:
    """Return an ASHA scheduler's grace period, reduction factor and rung milestones (epochs).

    The analysis counts the trials that reached each rung from these. Returns {} for other
    schedulers.
    """
    brackets = getattr(scheduler, "_brackets", None)
    if not isinstance(scheduler, ASHAScheduler) or not brackets:
        return {}
    # NOTE: Ray 2.60 keeps the rungs only in private attributes (_brackets[i]._rungs, a list
    # of (milestone, results) pairs); a Ray release that renames them leaves this empty.
    milestones = {m for bracket in brackets for m, _ in getattr(bracket, "_rungs", [])}
    if not milestones:
        return {}
    rungs = sorted(float(m) for m in milestones)
    return {
        "grace_period": min(rungs),
        "reduction_factor": scheduler._reduction_factor,
        "rungs": rungs,
    }


def _write_experiment_file(experiment_dir: Path, values: dict[str, Any]) -> None:
    atomic_write_text(experiment_dir / EXPERIMENT_FILE, json.dumps(values, indent=2) + "\n")
