"""Ray Tune's OptunaSearch with a truthful record of what the scheduler did.

Ray's OptunaSearch (Ray 2.60) records every trial that the scheduler stopped early as
COMPLETE with the value of its last epoch, so TPE treats partial values as final. This
subclass records such trials as PRUNED with their intermediate values, which is how
Optuna's own pruners leave them, and TPE then weighs them by the epoch they reached.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState
from ray import cloudpickle
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from sqlalchemy.engine import make_url

from glo_search.io import atomic_write_bytes
from glo_search.metrics import METRICS
from glo_search.storage import sqlite_path

logger = logging.getLogger(__name__)

STUDY_FILE = "optuna.db"
TUNE_TRIAL_ATTR = "tune_trial_id"

_scripts_lock = threading.Lock()


def share_migration_scripts() -> None:
    """Load Optuna's database migration scripts once per process, for every study storage.

    Creating a study file loads Optuna's 10 Alembic revision scripts three times, to learn
    the newest schema version and to stamp it. On one core of a 2-core AMD EPYC VM (Zen 1,
    Optuna 5.1) that took 0.17-0.19 s of the 0.17-0.24 s of the whole. The scripts do not
    depend on the database, so after this call every storage of the process shares one
    loaded copy.
    """
    # NOTE: _VersionManager and its _create_alembic_script are Optuna's private
    # interfaces (Optuna 5.1). Where they differ, each storage loads the scripts itself.
    try:
        from optuna.storages._rdb.storage import _VersionManager
    except ImportError:
        return
    with _scripts_lock:
        create = getattr(_VersionManager, "_create_alembic_script", None)
        if create is None or getattr(create, "shared_script", None) is not None:
            return
        try:
            manager = _VersionManager.__new__(_VersionManager)  # no database needed
            manager.url = "sqlite://"
            script = create(manager)
            script.get_current_head()  # loads the revision scripts
        except Exception as error:  # noqa: BLE001 - the storage's own loading then reports it
            logger.debug("loading Optuna's migration scripts failed: %s", error)
            return

        def shared(self):
            return script

        shared.shared_script = script
        _VersionManager._create_alembic_script = shared


# The bytes of a SQLite study file containing Optuna's tables and no study, once prepared.
_empty_study_file: bytes | None = None


def prepare_empty_study_file() -> None:
    """Build, once per process, a SQLite file with Optuna's tables and no study in it,
    which each new study file of the process then starts from.

    Optuna creates a new study file's tables one committed statement at a time. On a
    2-core Intel Xeon VM that took 25-27 ms, where writing the prepared file took 0.1-0.2
    ms and opening it 4 ms. A sweep prepares it while it checks its data. It is built in
    memory, so that a process that exits meanwhile leaves no file behind.
    """
    global _empty_study_file
    if _empty_study_file is not None:
        return
    try:
        storage = optuna.storages.RDBStorage("sqlite://")
        connection = storage.engine.raw_connection()  # the in-memory database's connection
        try:
            content = connection.driver_connection.serialize()
        finally:
            connection.close()
            storage.engine.dispose()
    except Exception as error:  # noqa: BLE001 - each study then creates its own tables
        logger.debug("preparing an empty study file failed: %s", error)
        return
    _empty_study_file = content


def _is_memory_sqlite(url: str) -> bool:
    """Return whether a SQLAlchemy URL names an in-memory SQLite database."""
    parts = make_url(url)
    if parts.get_backend_name() != "sqlite":
        return False
    return parts.database in (None, "", ":memory:") or parts.query.get("mode") == "memory"


def _start_study_file(url: str) -> None:
    """Write the prepared empty study file where a SQLite URL names a file, if none is
    there yet. URLs of in-memory databases and URLs with options are left to SQLite."""
    content = _empty_study_file
    if content is None:
        return
    parts = make_url(url)
    if parts.get_backend_name() != "sqlite" or parts.query:
        return
    if parts.database in (None, "", ":memory:"):
        return
    path = sqlite_path(url)
    if not path.exists():
        atomic_write_bytes(path, content)


class BatchingRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage that can commit a run of trial writes as one transaction.

    Inside ``with storage.batch():`` the thread's writes of parameters, user attributes
    and intermediate values wait, and the block's end commits them together. In SQLite's
    default journal mode each commit syncs the file and deletes a journal file, and one
    suggestion from the ``default`` space made 6 or 7 commits. On a 2-core Intel Xeon VM,
    each of a new study's first 16 suggestions took 19 ms in a block against 32 ms
    without (medians of 45).

    Reads inside the block do not see the waiting writes, so a block must not read what
    it writes. In Optuna 5.1 a suggestion reads only the finished trials of the study,
    and the Trial object keeps the new trial's parameters itself. A write that fails
    raises at the block's end, and none of the block's writes is then stored, unless
    another writer stored one of the block's rows first (an integrity error). The writes
    are then stored one at a time, as without a block: the duplicate is dropped, and
    those before a failing write stay. Every write commits on its own in an in-memory
    SQLite database, where the checks inside the writes would commit the block's writes
    early, and where Optuna lacks the private methods this relies on (those of Optuna
    5.1).
    """

    _supported = all(
        hasattr(optuna.storages.RDBStorage, name)
        for name in (
            "_set_trial_param",
            "_set_trial_param_without_commit",
            "_set_trial_attr_without_commit",
            "_set_trial_intermediate_value_without_commit",
        )
    )

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._batches = threading.local()
        self._batching = self._supported and not _is_memory_sqlite(url)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_batches", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._batches = threading.local()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Commit the trial writes of this thread inside the block as one transaction."""
        if not self._batching or getattr(self._batches, "writes", None) is not None:
            yield  # a nested block commits with the outer one
            return
        self._batches.writes = []
        try:
            yield
            writes = self._batches.writes
        finally:
            self._batches.writes = None
        if not writes:
            return
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy.exc import IntegrityError

        # A session of its own: the checks inside the writes read through the shared one,
        # whose commit would otherwise store the writes before a failing one.
        new_session = self.scoped_session.session_factory
        try:
            with _create_scoped_session(new_session) as session:
                for write in writes:
                    write(session)
        except IntegrityError:
            for write in writes:  # one at a time, each duplicate dropped as Optuna does
                with _create_scoped_session(new_session, True) as session:
                    write(session)

    def _defer(self, write: Callable[[Any], None]) -> bool:
        writes = getattr(self._batches, "writes", None)
        if writes is None:
            return False
        writes.append(write)
        return True

    # NOTE: the methods below override Optuna's private _set_trial_param (Optuna 5.1),
    # which both set_trial_param and Optuna's caching storage call.
    def _set_trial_param(self, trial_id, param_name, value, distribution, previous) -> None:
        def write(session) -> None:
            self._set_trial_param_without_commit(
                session, trial_id, param_name, value, distribution, previous
            )

        if not self._defer(write):
            super()._set_trial_param(trial_id, param_name, value, distribution, previous)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        from optuna.storages._rdb.models import TrialUserAttributeModel

        def write(session) -> None:
            self._set_trial_attr_without_commit(
                session, TrialUserAttributeModel, trial_id, key, value
            )

        if not self._defer(write):
            super().set_trial_user_attr(trial_id, key, value)

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        def write(session) -> None:
            self._set_trial_intermediate_value_without_commit(session, trial_id, step, value)

        if not self._defer(write):
            super().set_trial_intermediate_value(trial_id, step, value)


_rehearsed = False
REHEARSAL_STUDY = "glo-search-rehearsal"


def rehearse_study() -> None:
    """Create and use a study in an in-memory SQLite database, once per process.

    The first query of a process configures SQLAlchemy's mappers for Optuna's models, and
    under a profiler that took 0.12 s of the first study's 0.43 s. In a process's first
    sweep on a 2-core AMD EPYC VM (Zen 1), the searcher's study took 0.144-0.147 s to
    create without this rehearsal and 0.073-0.076 s after it.
    """
    global _rehearsed
    with _scripts_lock:
        if _rehearsed:
            return
        _rehearsed = True
    share_migration_scripts()
    # The rehearsal calls the storage directly, because study.tell would log a trial.
    # The storage itself logs one line, on the new study, which the filter drops.
    storage_logger = logging.getLogger("optuna.storages._rdb.storage")
    quiet = _DropMessagesNaming(REHEARSAL_STUDY)
    storage_logger.addFilter(quiet)
    try:
        storage = optuna.storages.RDBStorage("sqlite://")
        study_id = storage.create_new_study([StudyDirection.MAXIMIZE], REHEARSAL_STUDY)
        trial_id = storage.create_new_trial(study_id)
        for name, value, distribution in (
            ("x", 0.5, FloatDistribution(0.0, 1.0)),
            ("n", 2.0, IntDistribution(1, 10, log=True)),
            ("c", 1.0, CategoricalDistribution([0.0, 1.0])),
        ):
            storage.set_trial_param(trial_id, name, value, distribution)
        storage.set_trial_user_attr(trial_id, TUNE_TRIAL_ATTR, "rehearsal")
        storage.set_trial_intermediate_value(trial_id, 1, 0.5)
        storage.get_trial(trial_id)
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
        storage.get_all_trials(study_id, deepcopy=False)
        storage.remove_session()
        storage.engine.dispose()  # closes the connection, which frees the database
    except Exception as error:  # noqa: BLE001 - only a warm-up; the real study reports errors
        logger.debug("rehearsing a study in memory failed: %s", error)
    finally:
        storage_logger.removeFilter(quiet)


class _DropMessagesNaming(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class GloOptunaSearch(OptunaSearch):
    """OptunaSearch that records trials the scheduler stopped early as PRUNED.

    The searcher does not see the scheduler's decisions, so it reads them from the last
    result of a trial: a trial whose last ``epoch`` is below ``max_epochs`` and that did
    not diverge was stopped early. A diverged trial (``diverged`` = 1) is COMPLETE with
    the worst value of the metric, so TPE learns that its region fails; a trial that
    raised is FAIL. Intermediate values are keyed by epoch, so a trial that a crash or a
    resume sends back to an earlier checkpoint does not shift them, and a NaN is never
    passed to Optuna.

    Every Optuna trial carries the user attribute ``tune_trial_id``, the id of its Ray
    Tune trial, so the study can be joined with ``trials.parquet``.

    The searcher pickles without its storage connection (Tune pickles it into tuner.pkl
    and into its saved state) and opens the study again on first use, at ``study_url`` or
    at the place :meth:`relocate` names, so a moved experiment folder still resumes.

    Args:
        max_epochs: epochs of a trial that runs to the end (the scheduler's ``max_t``).
        study_url: SQLAlchemy URL of the study's storage.
        mirror: optional ``(location, relative_path)``: after each change the SQLite file
            is copied there, for experiment folders on object stores, where SQLite cannot
            live.
        **kwargs: passed to OptunaSearch (space, metric, mode, sampler, study_name,
            points_to_evaluate).
    """

    def __init__(self, *, max_epochs: int, study_url: str, mirror=None, **kwargs: Any) -> None:
        self._max_epochs = max_epochs
        self._study_url = study_url
        self._mirror = mirror
        self._relocated_to: tuple[str, Any] | None = None
        self._saved_trial_ids: dict[str, int] = {}
        self._known_epochs: dict[str, set[int] | None] = {}
        super().__init__(**kwargs)

    # Pickling and restoring.

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._ot_study is not None:
            state["_sampler"] = self._ot_study.sampler  # keeps TPE's random state
        state["_saved_trial_ids"] = {
            trial_id: ot_trial._trial_id for trial_id, ot_trial in self._ot_trials.items()
        }
        state.update(_ot_study=None, _storage=None, _ot_trials={}, _known_epochs={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The study opens on first use (see _ensure_study). A searcher pickled by an
        # earlier version has no _known_epochs, and the study is read again anyway.
        self.__dict__.update({**state, "_known_epochs": {}})

    def save(self, checkpoint_path: str) -> None:
        # cloudpickle stores a define-by-run space loaded from a user's .py file by value;
        # plain pickle would look its module up by name, which no process can import.
        with open(checkpoint_path, "wb") as output:
            cloudpickle.dump(self.__getstate__(), output)

    def restore(self, checkpoint_path: str) -> None:
        relocated_to = self._relocated_to
        with open(checkpoint_path, "rb") as source:
            self.__setstate__(pickle.load(source))
        if relocated_to is not None:
            self._relocated_to = relocated_to
            self._study_url, self._mirror = relocated_to
        self._open_study()
        self._fail_orphans()

    def relocate(self, study_url: str, mirror=None) -> None:
        """Use the study at study_url, for a sweep whose folder moved since it started."""
        self._relocated_to = (study_url, mirror)
        self._study_url, self._mirror = study_url, mirror
        if self._ot_study is not None:
            self._open_study()

    def _open_study(self) -> None:
        trial_ids = self._saved_trial_ids or {
            trial_id: ot_trial._trial_id for trial_id, ot_trial in self._ot_trials.items()
        }
        self._storage = BatchingRDBStorage(self._study_url)
        self._ot_study = optuna.load_study(
            study_name=self._study_name,
            storage=self._storage,
            sampler=self._sampler,
            pruner=optuna.pruners.NopPruner(),
        )
        self._ot_trials = {
            trial_id: optuna.trial.Trial(self._ot_study, ot_trial_id)
            for trial_id, ot_trial_id in trial_ids.items()
        }
        self._saved_trial_ids = {}

    def _ensure_study(self) -> None:
        if self._ot_study is None and self._space:
            self._open_study()

    def _setup_study(self, mode) -> None:
        _start_study_file(self._study_url)
        self._storage = BatchingRDBStorage(self._study_url)
        # Ray calls this again when a sweep resumes. The warm-start points are already in
        # the study from the first call, so enqueueing them again would run them twice.
        points = self._points_to_evaluate
        if points and self._study_has_trials():
            self._points_to_evaluate = []
            try:
                super()._setup_study(mode)
            finally:
                self._points_to_evaluate = points
            return
        super()._setup_study(mode)

    def _study_has_trials(self) -> bool:
        try:
            study_id = self._storage.get_study_id_from_name(self._study_name)
        except KeyError:
            return False
        return bool(self._storage.get_all_trials(study_id, deepcopy=False))

    def _fail_orphans(self) -> None:
        """Mark FAIL the study's RUNNING trials that no Tune trial owns.

        Optuna creates a trial when the searcher requests a configuration. When the driver
        dies before Tune's next save of its state, the restored searcher has no record of
        that trial, so it would stay RUNNING forever.
        """
        owned = {ot_trial._trial_id for ot_trial in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id in owned:
                continue
            logger.warning(
                "Optuna trial %d was created but never started before the sweep stopped; "
                "marking it FAIL",
                frozen.number,
            )
            self._ot_study.tell(frozen.number, state=TrialState.FAIL)
        self.sync_mirror()

    # What Tune calls during a sweep.

    def suggest(self, trial_id: str) -> dict | None:
        self._ensure_study()
        is_new = trial_id not in self._ot_trials
        with self._storage.batch():  # the parameters and the attribute: one commit
            params = super().suggest(trial_id)
            is_new = is_new and trial_id in self._ot_trials
            if is_new:
                self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        if is_new:
            self._known_epochs[trial_id] = set()  # a new trial: nothing to read back
            self.sync_mirror()
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._ensure_study()
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        self._ensure_study()
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self._epochs_in_study(trial_id) is None:
            return
        ot_trial = self._ot_trials[trial_id]
        state, value = self._final_state(result, error)
        # These writes share one commit, which comes before tell, because tell reads a
        # pruned trial's last intermediate value back from the study as its value.
        try:
            with self._storage.batch():
                if result and state != TrialState.FAIL:
                    # Tune passes the result that made the scheduler stop a trial only here.
                    self._report(trial_id, result)
                if result and state == TrialState.PRUNED:
                    ot_trial.set_user_attr("stopped_at_epoch", int(result["epoch"]))
                if result and result.get("diverged"):
                    ot_trial.set_user_attr("diverged", True)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another process recorded the trial's end since this one read the study.
            self._known_epochs[trial_id] = None
            self._completed_trials.add(trial_id)
            return
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except (ValueError, RuntimeError) as exc:  # e.g. finished in the study before a resume
            logger.warning("cannot record trial %s in the Optuna study: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
        self.sync_mirror()

    def _final_state(self, result: dict | None, error: bool) -> tuple[TrialState, Any]:
        if error:
            return TrialState.FAIL, None
        if not result or self.metric not in result:
            return TrialState.PRUNED, None  # removed before it reported anything
        value = float(result[self.metric])
        if not math.isfinite(value):
            # The trainable reports worst values instead of NaN; this guards other code.
            return TrialState.FAIL, None
        if result.get("diverged"):
            return TrialState.COMPLETE, METRICS[self.metric].worst
        if int(result.get("epoch", self._max_epochs)) < self._max_epochs:
            return TrialState.PRUNED, None
        return TrialState.COMPLETE, value

    def _report(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is None or not math.isfinite(value):
            return  # Optuna would store NaN, and TPE would rank it as a real value
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        epochs = self._epochs_in_study(trial_id)
        if epochs is None or step in epochs:
            return  # an epoch repeated after a retry from an earlier checkpoint
        try:
            self._ot_trials[trial_id].report(float(value), step)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another process recorded the trial's end since this one read the study.
            self._known_epochs[trial_id] = None
            self._completed_trials.add(trial_id)
            return
        epochs.add(step)

    def _epochs_in_study(self, trial_id: str) -> set[int] | None:
        """Return the epochs with an intermediate value in the study for this trial, or
        None when the study already recorded the trial's end.

        The study is read once per trial and driver process, because reading it for
        every result took about 5 ms of the driver's time, during which the trial waits.
        Later reports add to the set, and a report that finds the trial finished marks it
        finished here too. A study that recorded the end of a trial that Tune runs again
        means that the driver was killed after the study's record but before Tune saved
        its state. The study then keeps its first record, and the trial is marked
        completed here.
        """
        if trial_id not in self._known_epochs:
            ot_trial = self._ot_trials[trial_id]
            stored = ot_trial.storage.get_trial(ot_trial._trial_id)
            finished = stored.state.is_finished()
            self._known_epochs[trial_id] = None if finished else set(stored.intermediate_values)
        epochs = self._known_epochs[trial_id]
        if epochs is None:
            self._completed_trials.add(trial_id)
        return epochs

    def sync_mirror(self) -> None:
        """Copy the local SQLite study to the experiment folder, when it lives elsewhere."""
        if self._mirror is None:
            return
        location, relative = self._mirror
        location.upload(sqlite_path(self._study_url), relative)


def base_searcher(search_alg: Any) -> Any:
    """Return the searcher inside Tune's wrappers (SearchGenerator, ConcurrencyLimiter)."""
    while hasattr(search_alg, "searcher"):
        search_alg = search_alg.searcher
    return search_alg


class RelocatableSearchGenerator(SearchGenerator):
    """SearchGenerator that creates the trials of a resumed sweep in the folder as it is now.

    Ray Tune's SearchGenerator (Ray 2.60) restores the experiment spec it saved, storage
    path included, so trials created after resuming a moved folder would be set up at the
    folder's old place, and fail there. :meth:`relocate` names the current place.
    """

    def __init__(self, searcher) -> None:
        super().__init__(searcher)
        self._location = None

    def relocate(self, location) -> None:
        self._location = location

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self._location is None or self._experiment is None:
            return
        # The same fields that Tune's controller updates on the trials it restores; the
        # copy keeps the saved staging folder, which the restored run reuses.
        storage = copy.copy(self._experiment.storage)
        storage.storage_filesystem = self._location.filesystem
        storage.storage_fs_path = self._location.storage_path
        storage.experiment_dir_name = self._location.name
        self._experiment.storage = storage
        self._experiment.spec["storage"] = storage
