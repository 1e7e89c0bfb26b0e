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
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
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
from ray.tune.search import ConcurrencyLimiter, SearchAlgorithm, Searcher

from glo_search import classifier
from glo_search.config import ConfigError, TrainConfig, from_dict
from glo_search.metrics import metric_mode
from glo_search.points import check_points, read_points
from glo_search.results import ResultsWriter
from glo_search.searcher import (
    STUDY_FILE,
    GloOptunaSearch,
    RelocatableSearchGenerator,
    base_searcher,
    prepare_empty_study_file,
    rehearse_study,
)
from glo_search.spaces import ResolvedSpace, resolve
from glo_search.storage import ExperimentLocation, driver_lock, locate, sqlite_url
from glo_search.trainable import train_glo
from glo_search.warm import preload_system_config

logger = logging.getLogger(__name__)

SCHEDULERS = ("asha", "hyperband", "median", "fifo")
SAMPLERS = ("tpe", "random")
EXPERIMENT_FILE = "experiment.json"
DEFAULT_MAX_FAILURES = 2


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
        return LastEpochFIFOScheduler(max_epochs)
    raise ConfigError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")


class LastEpochFIFOScheduler(FIFOScheduler):
    """FIFOScheduler that stops a trial at its result of epoch ``max_epochs``.

    A trial then ends on its last result, as ASHA's trials do at ``max_t``. Under plain
    FIFOScheduler, Tune requests one more result from the trial, whose reply shows that
    the function returned. That round trip between driver and worker took 7-15 ms per
    trial on a 2-core Intel Xeon VM, and the worker waits through it for its next trial.
    """

    def __init__(self, max_epochs: int) -> None:
        super().__init__()
        self.max_epochs = max_epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch", 0) >= self.max_epochs:
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)


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
    return optuna.storages.RDBStorage(sqlite_url(experiment_dir / STUDY_FILE))


def study_place(location: ExperimentLocation) -> tuple[str, tuple | None]:
    """SQLAlchemy URL of the study's SQLite file, and where to mirror it (or None).

    SQLite needs a local file that it can lock, so for an experiment folder on an object
    store the study lives in a local temporary folder and is copied into the experiment
    folder after every change (see GloOptunaSearch's ``mirror``).
    """
    if location.is_local:
        return sqlite_url(location.local_dir / STUDY_FILE), None
    local_dir = Path(tempfile.mkdtemp(prefix=f"glo-study-{location.name}-"))
    if location.has_file(STUDY_FILE):
        location.download(STUDY_FILE, local_dir / STUDY_FILE)
    logger.info("Optuna study kept in %s and copied to %s", local_dir, location.uri)
    return sqlite_url(local_dir / STUDY_FILE), (location, STUDY_FILE)


def make_searcher(
    space: ResolvedSpace,
    metric: str,
    mode: str,
    study_url: str,
    study_name: str,
    max_epochs: int,
    sampler: str = "tpe",
    seed: int = 0,
    points: list[dict] | None = None,
    mirror: tuple | None = None,
) -> GloOptunaSearch:
    """OptunaSearch over the space that records early-stopped trials as PRUNED."""
    searcher_space = None if space.kind == "ray" else space.space
    return GloOptunaSearch(
        space=searcher_space,
        metric=metric,
        mode=mode,
        sampler=make_sampler(sampler, seed),
        study_url=study_url,
        study_name=study_name,
        max_epochs=max_epochs,
        points_to_evaluate=points or None,
        mirror=mirror,
    )


def _base_config(base_config: TrainConfig | dict | None, max_epochs: int) -> TrainConfig:
    if isinstance(base_config, TrainConfig):
        base_config = base_config.to_dict()
    return from_dict({**(base_config or {}), "epochs": max_epochs})


def _sets_eval_every(base_config: TrainConfig | dict | None) -> bool:
    return isinstance(base_config, TrainConfig) or "eval_every" in (base_config or {})


def default_eval_every(scheduler: TrialScheduler, max_epochs: int) -> int:
    """Return the sweep's eval_every when the caller sets none.

    An ASHA scheduler that counts epochs compares trials only at its rungs, so metrics
    are computed there and at the last epoch (``max_epochs``). Computed every epoch, they
    would take about half of a sweep's time. Any other scheduler may decide at any epoch,
    so it gets metrics every epoch (1).
    """
    rungs = scheduler_settings(scheduler).get("rungs")
    counts_epochs = getattr(scheduler, "_time_attr", None) == "epoch"
    return max_epochs if rungs and counts_epochs else 1


def _check_overlap(space: ResolvedSpace, fixed: dict | None) -> None:
    overlap = sorted(space.keys & set(fixed or {}))
    if overlap:
        raise ConfigError(
            f"{overlap[0]} is set both as a fixed value and by search space "
            f"{space.name!r}; drop the fixed value or use a space without {overlap[0]}"
        )


def _experiment_location(storage: str | Path, name: str) -> ExperimentLocation:
    location = locate(storage, name)
    try:
        taken = location.exists() and not location.is_empty()
    except OSError as error:
        raise ConfigError(f"cannot read storage {location.uri}: {error}") from None
    if taken:
        raise ConfigError(
            f"experiment folder {location.uri} already exists and is not empty; "
            f"choose another --name, or continue it with: glo-search resume {location.uri}"
        )
    return location


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard_host: str | None = None,
) -> None:
    """Connect to a Ray cluster at address, or start Ray in this process.

    Without an address Ray starts locally even when `ray start` left a cluster running,
    which ray.init() would join by default. The dashboard stays off unless
    ``dashboard_host`` names the address to bind it to (``127.0.0.1`` for this machine
    only). A cluster's dashboard is set where the cluster starts (`ray start
    --dashboard-host`).

    ray.init replaces the process's SIGTERM handler with one that aborts with a native
    stack dump, which would leave no summary and no resume hint when a job scheduler
    (SLURM, systemd, `docker stop`) stops a sweep. Afterwards SIGTERM acts as Ctrl-C
    does: Tune ends the sweep and saves its state. A handler set from Python before
    this call, or SIG_IGN, is put back instead.
    """
    options = ray_init_options(address, num_cpus, dashboard_host)  # checks the request
    if address:
        check_address_reachable(address)
    if ray.is_initialized():
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**options)
    except (ConnectionError, ValueError) as error:
        raise ConfigError(
            f"cannot connect to the Ray cluster at --address {address}: {error}"
        ) from None
    if threading.current_thread() is threading.main_thread():
        keep_previous = callable(previous) or previous == signal.SIG_IGN
        signal.signal(signal.SIGTERM, previous if keep_previous else _interrupt_on_sigterm)


@contextmanager
def tune_output(verbose: int | None) -> Iterator[None]:
    """Run Tune with its older console reporter when ``verbose`` is 0.

    The newer reporter (Ray 2.60) prints a box of the experiment's settings and the
    folder's path even at verbosity 0, which -q is meant to hide. The older one prints
    nothing at that level.
    """
    if verbose != 0:
        yield
        return
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def _interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """Handle SIGTERM with the current SIGINT handler: Tune's during a run."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


# Seconds to wait for a TCP connection to a cluster's address before giving up.
CONNECT_TIMEOUT_S = 10.0


def check_address_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Check that something accepts TCP connections at a HOST:PORT cluster address.

    ray.init retries an address where nothing listens without end (Ray 2.60), so an
    address with a typo would hang the sweep. "auto" and "local" are left to Ray.
    """
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"invalid --address {address!r}: expected HOST:PORT of a Ray cluster's head, "
            "e.g. 10.0.0.5:6379, or 'auto'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise ConfigError(
            f"cannot connect to the Ray cluster at --address {address}: {error} (waited up "
            f"to {timeout:g} s); check the address, or start the cluster with `ray start "
            "--head`"
        ) from None


def ray_init_options(
    address: str | None, num_cpus: int | None, dashboard_host: str | None
) -> dict[str, Any]:
    """Keyword arguments of ray.init, after checking the dashboard request."""
    options: dict[str, Any] = {
        "address": address or "local",
        "num_cpus": None if address else num_cpus,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }
    if not address:
        options["_system_config"] = preload_system_config()
    if dashboard_host is None:
        return options
    if address:
        raise ConfigError(
            "--dashboard starts the dashboard of a Ray instance on this machine; with "
            "--address the cluster's own dashboard applies (ray start --dashboard-host)"
        )
    missing = dashboard_dependency_error()
    if missing:
        raise ConfigError(
            f"--dashboard needs Ray's dashboard packages ({missing}); install them with: "
            "pip install 'ray[default]'"
        )
    options.update(include_dashboard=True, dashboard_host=dashboard_host)
    return options


def dashboard_dependency_error() -> str | None:
    """Why Ray cannot start its dashboard here, or None when it can."""
    # NOTE: this is the private check that Ray 2.60 runs before starting the dashboard.
    # A Ray release without it skips the check here, and ray.init reports the problem.
    check = getattr(ray._private.utils, "get_dashboard_dependency_error", None)
    return None if check is None else check()


def make_trainable(
    base: dict[str, Any],
    classifier_state: dict | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
    metric: str,
    eval_epochs: tuple[int, ...] = (),
):
    """Build the trainable of a sweep; ``resume`` calls this with experiment.json's values.

    Trials compute their metrics at each of ``eval_epochs`` (the scheduler's rungs, see
    :func:`rung_epochs`) whatever their ``eval_every``.
    """
    return tune.with_resources(
        tune.with_parameters(
            train_glo,
            base=base,
            classifier_state=classifier_state,
            metric=metric,
            eval_epochs=eval_epochs,
        ),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )


def rung_epochs(settings: dict[str, Any]) -> tuple[int, ...]:
    """Return the epochs of the rungs in experiment.json's settings, rounded up.

    ASHA decides at a trial's first result at or past a rung, so a rung of 12.5 epochs
    is decided at epoch 13.
    """
    return tuple(math.ceil(rung) for rung in settings.get("rungs", ()))


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
    max_failures: int = DEFAULT_MAX_FAILURES,
    points: str | Path | list[dict] | None = None,
    callbacks: list[tune.Callback] | None = None,
    dashboard_host: str | None = None,
    verbose: int = 1,
    reuse_actors: bool = True,
) -> tune.ResultGrid:
    """Run a hyperparameter sweep of the GLO trainer and return Ray Tune's ResultGrid.

    Every input is checked before Ray starts, and the experiment folder is created only
    after that, so a sweep that fails to start leaves no folder behind.

    Args:
        space: a search space name from ``search_spaces``, a path to a .py file defining
            ``SPACE``, an Optuna define-by-run function, or a dict of Optuna
            distributions or Ray Tune domains keyed by TrainConfig field. May be None
            when ``search_alg`` carries its own space.
        metric: the metric that the searcher optimizes, the scheduler stops on and
            checkpoints are kept by; its direction comes from ``glo_search.metrics``.
        base_config: fixed TrainConfig values for every trial (a TrainConfig or a dict
            of overrides); keys the space varies must not appear here. Without
            ``eval_every`` in a dict, trials compute metrics at every epoch, or with an
            ASHA scheduler (the default) only at its rungs and the last epoch.
        scheduler: any Ray Tune TrialScheduler, created without metric and mode (the
            sweep sets them). Default: ASHA with ``grace_period`` and
            ``reduction_factor``, one unit of time per epoch.
        search_alg: any Ray Tune searcher. Default: OptunaSearch with ``sampler``
            ("tpe" or "random", seeded by ``seed``), the study in
            ``<experiment>/optuna.db``, and trials the scheduler stopped early recorded
            as PRUNED. A custom searcher needs a space given as a dict of Ray Tune
            domains, or a space of its own.
        storage: local folder, or a URI that pyarrow.fs understands (``file://``,
            ``s3://``, ``gs://``), under which the experiment folder ``name`` is
            created. On a cluster it must be reachable from every node.
        max_concurrent: trials running at once; default: as many as resources allow.
        cpus_per_trial, gpus_per_trial: resources of each trial (fractions allowed).
        address: a Ray cluster address; default: start Ray in this process.
        max_failures: times a crashed trial is restarted from its latest checkpoint
            before it is recorded as an error.
        points: configurations evaluated first (warm start): a list of dicts, or a
            JSON or YAML file with one; keys must be keys the space varies.
        callbacks: extra Ray Tune callbacks, after the sweep's own result writers.
        dashboard_host: start Ray's dashboard bound to this address (local Ray only);
            default: no dashboard.
        reuse_actors: run a new trial in the process of a finished one, which saves
            starting a Ray worker and importing torch for every trial (Ray Tune's
            ``TuneConfig.reuse_actors``); it halves the wall time of the default sweep.
            Turn it off for a trainable that leaves global state behind.
    """
    mode = _check_metric(metric)
    fixed = base_config.to_dict() if isinstance(base_config, TrainConfig) else base_config
    base = _base_config(base_config, max_epochs)
    resolved = _resolve_space(space, base, search_alg)
    if resolved is not None and isinstance(base_config, dict):
        _check_overlap(resolved, fixed)
    _check_resources(cpus_per_trial, gpus_per_trial, num_samples, max_concurrent)
    if address is None:
        _check_local_fit(cpus_per_trial, gpus_per_trial)
    _check_max_failures(max_failures)
    warm_start = _warm_start_points(points, resolved, search_alg, base, num_samples)
    if name is None:
        name = f"{resolved.name if resolved else 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_name(name)
    location = _experiment_location(storage, name)
    study_preparation = _start_study_preparation()
    _check_data(base)
    _check_perceptual_weights(base)
    classifier_state = classifier.load_state()

    location.create()
    with driver_lock(location):
        try:
            ensure_ray(address, dashboard_host=dashboard_host)
            configure_tune_environment()
            study_preparation.join()
            tuner, search_alg = _build_tuner(
                location=location,
                resolved=resolved,
                metric=metric,
                mode=mode,
                base=base,
                search_alg=search_alg,
                scheduler=scheduler,
                settings={
                    "name": name,
                    "storage": str(storage),
                    "metric": metric,
                    "mode": mode,
                    "space": resolved.name if resolved else None,
                    "space_kind": resolved.kind if resolved else None,
                    "space_source": space_source(space),
                    "num_samples": num_samples,
                    "max_epochs": max_epochs,
                    "seed": seed,
                    "sampler": sampler,
                    "grace_period": grace_period,
                    "reduction_factor": reduction_factor,
                    "max_failures": max_failures,
                    "points": warm_start,
                    "cpus_per_trial": cpus_per_trial,
                    "gpus_per_trial": gpus_per_trial,
                },
                classifier_state=classifier_state,
                max_concurrent=max_concurrent,
                callbacks=callbacks,
                verbose=verbose,
                reuse_actors=reuse_actors,
                eval_every_given=_sets_eval_every(base_config),
            )
        except BaseException:
            location.remove()  # nothing ran yet: leave no folder that resume would trip on
            raise
        try:
            with tune_output(verbose):
                return tuner.fit()
        finally:
            _copy_study(search_alg, location)


def _start_study_preparation() -> threading.Thread:
    """Start a thread that imports, loads and configures what the study's SQLite storage needs.

    The first RDBStorage of a process imports Optuna's SQLAlchemy models and Alembic,
    which took 0.45 s of the 0.65 s it took to create the study (Optuna 5.1, one core of
    a 2-core AMD EPYC VM), and every RDBStorage reads Optuna's migration scripts
    (see :func:`glo_search.searcher.share_migration_scripts`). SQLAlchemy also configures
    its mappers on a process's first query (see :func:`glo_search.searcher.rehearse_study`),
    and a new study file starts as a copy of a prepared one that holds Optuna's tables (see
    :func:`glo_search.searcher.prepare_empty_study_file`). All of that then happens while
    the sweep loads its data and Ray starts, instead of before the first trial is
    requested.
    """

    def prepare() -> None:
        try:
            # NOTE: optuna.storages._rdb.models is Optuna's private module (Optuna 5.1).
            # Where it is missing, the study's creation imports what it needs itself.
            import alembic.migration  # noqa: F401
            import alembic.script  # noqa: F401
            import optuna.storages._rdb.models  # noqa: F401
        except ImportError as error:
            logger.debug("importing the study storage's modules failed: %s", error)
        rehearse_study()
        prepare_empty_study_file()

    thread = threading.Thread(target=prepare, name="study-preparation", daemon=True)
    thread.start()
    return thread


def space_source(space: Any) -> str | None:
    """Return how experiment.json records a space given by name or file, else None.

    A file is recorded by its absolute path, so resume finds it from any folder.
    """
    if not isinstance(space, str):
        return None
    if space.endswith(".py"):  # search_spaces.load reads names ending in .py as files
        return str(Path(space).resolve())
    return space


def configure_tune_environment() -> None:
    """Set the Ray Tune options that sweep and resume share, before Tune starts.

    Tune reads these environment variables when a run starts, in the driver.
    """
    # Ray's automatic TensorBoard logger would duplicate the trainable's own event files.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Keeping only the best checkpoint makes Tune snapshot its state at every checkpoint
    # and warn each time. The snapshot is small, so the warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        tune_logger = logging.getLogger(name)
        if not any(isinstance(f, MisleadingTuneLines) for f in tune_logger.filters):
            tune_logger.addFilter(MisleadingTuneLines())


class MisleadingTuneLines(logging.Filter):
    """Drop two lines that Ray Tune (2.60) logs when a sweep is interrupted.

    One suggests resuming with Tuner.restore, which would skip what glo_search.resume
    does: rebuilding the trainable, refilling the ASHA rungs and pointing the study at a
    moved folder. The summary prints `glo-search resume` instead. The other reports a
    FileNotFoundError for each trial stopped before its first result, which has no
    results to lose. Its other errors are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Experiment has been interrupted"):
            return False
        if message.startswith("Failed to fetch metrics"):
            failures = message.splitlines()[1:]
            return not all("FileNotFoundError" in line for line in failures)
        return True


def _check_data(base: TrainConfig) -> None:
    """Load the training digits once in the driver, so a data error stops the sweep here
    instead of failing every trial."""
    from glo_search.data import load_dataset

    load_dataset(base)


def _check_perceptual_weights(base: TrainConfig) -> None:
    """Load a VGG19 weights file once in the driver, so that a bad file stops the sweep
    here instead of failing every trial. The space may choose the loss, so the file is
    checked whatever the base loss is."""
    if base.perceptual_weights:
        from glo_search.losses import vgg19_perceptual_loss

        vgg19_perceptual_loss(base.perceptual_weights)


def _build_tuner(
    *,
    location: ExperimentLocation,
    resolved: ResolvedSpace | None,
    metric: str,
    mode: str,
    base: TrainConfig,
    search_alg,
    scheduler,
    settings: dict[str, Any],
    classifier_state,
    max_concurrent: int | None,
    callbacks: list | None,
    verbose: int,
    reuse_actors: bool,
    eval_every_given: bool = True,
) -> tuple[tune.Tuner, Any]:
    if search_alg is None:
        study_url, mirror = study_place(location)
        searcher = make_searcher(
            resolved,
            metric,
            mode,
            study_url,
            settings["name"],
            settings["max_epochs"],
            settings["sampler"],
            settings["seed"],
            settings["points"],
            mirror,
        )
        if max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        # Wrapped here, not by Tune, so that resume can relocate the restored generator.
        search_alg = RelocatableSearchGenerator(searcher)
        max_concurrent = None
    scheduler = scheduler or make_scheduler(
        "asha", settings["max_epochs"], settings["grace_period"], settings["reduction_factor"]
    )
    if not eval_every_given:
        base = replace(base, eval_every=default_eval_every(scheduler, settings["max_epochs"]))
    settings = {
        **settings,
        "scheduler": type(scheduler).__name__,
        "base_config": base.to_dict(),
        "classifier": asdict(classifier.load_info()),
        **scheduler_settings(scheduler),
    }
    location.write_bytes(EXPERIMENT_FILE, (json.dumps(settings, indent=2) + "\n").encode())

    trainable = make_trainable(
        base.to_dict(),
        classifier_state,
        settings["cpus_per_trial"],
        settings["gpus_per_trial"],
        metric,
        rung_epochs(settings),
    )
    tuner = tune.Tuner(
        trainable,
        param_space=resolved.space if resolved is not None and resolved.kind == "ray" else {},
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=settings["num_samples"],
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=trial_dirname,
            reuse_actors=reuse_actors,
            **_tune_metric(scheduler, metric, mode),
        ),
        run_config=_run_config(
            location,
            base.to_dict(),
            metric,
            mode,
            settings["max_epochs"],
            settings["max_failures"],
            callbacks or [],
            verbose,
        ),
    )
    return tuner, search_alg


def _copy_study(search_alg, location: ExperimentLocation) -> None:
    # NOTE: for an experiment folder on an object store, this final copy makes optuna.db
    # in the folder match the local SQLite study. A killed driver skips it, and the copy
    # made after the last recorded change is what a resume then downloads.
    searcher = base_searcher(search_alg)
    if isinstance(searcher, GloOptunaSearch):
        searcher.sync_mirror()
    if not location.is_local:
        logger.info("Optuna study copied to %s/%s", location.uri, STUDY_FILE)


def _warm_start_points(points, resolved, search_alg, base, num_samples) -> list[dict] | None:
    if points is None:
        return None
    if search_alg is not None or resolved is None:
        raise ConfigError(
            "warm-start points need the default Optuna searcher; pass "
            "points_to_evaluate to your own search_alg instead"
        )
    source = "points"
    if isinstance(points, (str, Path)):
        source = str(points)
        points = read_points(points)
    return check_points(points, resolved, base, num_samples, source)


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


def _check_local_fit(cpus: float, gpus: float) -> None:
    """Reject trial resources that local Ray cannot give, since Ray would wait forever."""
    if ray.is_initialized():
        available_cpus = ray.cluster_resources().get("CPU", 0)
    else:
        available_cpus = len(os.sched_getaffinity(0))
    if cpus > available_cpus:
        raise ConfigError(
            f"invalid cpus_per_trial={cpus} (--cpus-per-trial): this machine has "
            f"{available_cpus:g} CPUs, so no trial could start; lower it or pass --address"
        )
    if gpus > 0:
        import torch

        available_gpus = torch.cuda.device_count()
        if ray.is_initialized():
            available_gpus = ray.cluster_resources().get("GPU", 0)
        if gpus > available_gpus:
            raise ConfigError(
                f"invalid gpus_per_trial={gpus} (--gpus-per-trial): this machine has "
                f"{available_gpus:g} CUDA GPUs, so no trial could start; lower it or pass "
                "--address"
            )


def local_trial_slots(
    cpus: float, gpus: float, num_samples: int, max_concurrent: int | None
) -> int:
    """Return how many trials can run at once on the running Ray instance's resources."""
    resources = ray.cluster_resources()
    slots = min(num_samples, math.floor(resources.get("CPU", 0) / cpus))
    if gpus > 0:
        slots = min(slots, math.floor(resources.get("GPU", 0) / gpus))
    if max_concurrent is not None:
        slots = min(slots, max_concurrent)
    return slots


def _check_name(name: str) -> None:
    """Reject experiment names that would leave --storage, nest folders, or make a folder
    that is hard to name in a shell or that the filesystem refuses."""
    problem = _name_problem(name)
    if problem:
        raise ConfigError(
            f"invalid --name {name!r}: {problem}; use a plain folder name, such as 'default-run'"
        )


# ext4 and XFS take file names of at most 255 bytes.
MAX_NAME_BYTES = 255


def _name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name.startswith("."):
        return "it starts with '.'"
    if name != name.strip():
        return "it starts or ends with a space"
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return "it contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


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
    location: ExperimentLocation,
    base: dict,
    metric: str,
    mode: str,
    max_epochs: int,
    max_failures: int,
    callbacks: list,
    verbose: int,
) -> tune.RunConfig:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return tune.RunConfig(
        name=location.name,
        storage_path=location.storage_path,
        storage_filesystem=None if location.is_local else location.filesystem,
        # On storage other than local, trials write their TensorBoard files into their
        # working folder (see trainable._log_dir), and Tune copies it into the trial folder.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        callbacks=[
            JsonLoggerCallback(),
            CSVLoggerCallback(),
            ResultsWriter(location, base, metric, mode, max_epochs),
            *callbacks,
        ],
        failure_config=tune.FailureConfig(max_failures=max_failures),
        verbose=verbose,
    )


def _check_max_failures(max_failures: int) -> None:
    if max_failures < 0:
        raise ConfigError(
            f"invalid max_failures={max_failures} (--max-failures): must be >= 0 "
            "(0: a crashed trial is not retried)"
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
