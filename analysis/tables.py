"""The report's tables as functions of the trials and epochs DataFrames of ``analysis.load``.

Diverged trial-epochs carry every metric at its worst value by design, so the functions
that correlate or summarize metric values drop them; the counts of trials keep them.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from glo_search.config import FIELDS, SEARCHED
from glo_search.metrics import IDEAL_NEIGHBOURS, METRICS

logger = logging.getLogger(__name__)

NEAREST_COLUMNS = [f"nearest_{k}" for k in range(10)]
# ``epochs`` is the sweep's max epochs, the same for every trial (``epochs_run`` varies).
NOT_HYPERPARAMETERS = ("epochs",)
IMPORTANCE_EVALUATORS = ("ped_anova", "fanova")
# Optuna's fANOVA defaults (64 trees of depth 64) took 40 s on a 1,000-trial study on
# 2 cores (benchmarks/bench_analysis.py); 32 trees of depth 8 took 3 s and ranked the
# parameters the same there.
FANOVA_TREES = 32
FANOVA_MAX_DEPTH = 8


def best_column(metric: str) -> str:
    return f"best_{metric}"


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")


def _ascending(metric: str) -> bool:
    return METRICS[metric].mode == "min"


def searched_params(trials: pd.DataFrame, study=None) -> list[str]:
    """Return the TrainConfig fields that vary across trials or that the study searched.

    Falls back to the usual searched fields (class_dim, content_dim, noise_std,
    content_decay) when nothing varies, as in a sweep of a single trial.
    """
    names = {name for name in FIELDS if name in trials and trials[name].nunique() > 1}
    if study is not None:
        for trial in study.get_trials(deepcopy=False):
            names |= set(trial.distributions) & set(FIELDS)
    names -= set(NOT_HYPERPARAMETERS)
    if not names:
        names = set(SEARCHED)
    return [name for name in FIELDS if name in names]


def categorical_params(trials: pd.DataFrame, params: list[str], study=None) -> list[str]:
    """Return the params that take categories: string and bool fields, and study choices."""
    choices = set()
    if study is not None:
        from optuna.distributions import CategoricalDistribution

        for trial in study.get_trials(deepcopy=False):
            for name, distribution in trial.distributions.items():
                if isinstance(distribution, CategoricalDistribution):
                    choices.add(name)
    return [name for name in params if FIELDS[name].type in ("str", "bool") or name in choices]


def param_scales(trials: pd.DataFrame, params: list[str], study=None) -> dict[str, str]:
    """Return the axis scale of each param: ``log``, ``symlog`` or ``linear``.

    A param is logarithmic when the study's distribution of it has ``log=True``; ``symlog``
    replaces ``log`` when some trials have the value 0 (such as content_decay = 0 as its
    own branch). A param the study does not know, or a categorical one, is taken as
    logarithmic when its values are positive and span at least two decades.
    """
    logs: set[str] = set()
    known: set[str] = set()
    if study is not None:
        for trial in study.get_trials(deepcopy=False):
            for name, distribution in trial.distributions.items():
                if hasattr(distribution, "log"):
                    known.add(name)
                    if distribution.log:
                        logs.add(name)
    scales = {}
    for name in params:
        values = pd.to_numeric(trials[name], errors="coerce").dropna() if name in trials else []
        if FIELDS[name].type in ("str", "bool") or len(values) == 0:
            scales[name] = "linear"
            continue
        positive = values[values > 0]
        spans_decades = len(positive) > 0 and positive.max() >= 100 * positive.min()
        is_log = name in logs or (name not in known and spans_decades)
        if not is_log:
            scales[name] = "linear"
        elif (values <= 0).any():
            scales[name] = "symlog"
        else:
            scales[name] = "log"
    return scales


def best_trials(trials: pd.DataFrame, metric: str, top: int = 10, params=None) -> pd.DataFrame:
    """Return the ``top`` trials by their best value of ``metric``.

    Columns: trial_id (and experiment, for several folders), status, the searched
    hyperparameters, best_epoch (the epoch of the best ``metric``), epochs run, the best
    value of ``metric``, then every other metric at best_epoch (``at_best_<name>``, as the
    sweep's summary prints them; a table without those columns gives each metric's own
    best). Trials without a value sort last.
    """
    _check_metric(metric)
    params = searched_params(trials) if params is None else params
    metric_columns = [best_column(metric)] + [
        f"at_best_{name}" if f"at_best_{name}" in trials else best_column(name)
        for name in METRICS
        if name != metric
    ]
    leading = (
        ["experiment"] if "experiment" in trials and trials["experiment"].nunique() > 1 else []
    )
    columns = leading + [
        "trial_id",
        "status",
        *params,
        "best_epoch",
        "epochs_run",
        *metric_columns,
    ]
    ordered = trials.sort_values(
        best_column(metric), ascending=_ascending(metric), na_position="last", kind="stable"
    )
    return ordered[[c for c in columns if c in trials]].head(top).reset_index(drop=True)


def ranked_by(trials: pd.DataFrame, epochs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Return a copy of trials whose best_epoch and at_best_<name> follow ``metric``.

    trials.parquet takes them at the best epoch of the sweep's own metric. A report
    ranked by another metric recomputes them from the epoch rows, as the sweep would have.
    Trials without epoch rows keep their values.
    """
    from glo_search.results import summarize

    _check_metric(metric)
    several = "experiment" in trials and "experiment" in epochs
    keys = ["experiment", "trial_id"] if several else ["trial_id"]
    # Grouping by a list gives tuple keys, even for a list of one column (pandas 2).
    rows_of = {
        key: group.sort_values("epoch").to_dict("records")
        for key, group in epochs.groupby(keys, sort=False)
    }
    ranked = trials.copy()
    for index, trial in trials.iterrows():
        rows = rows_of.get(tuple(trial[k] for k in keys))
        if not rows:
            continue
        summary = summarize(rows, metric, METRICS[metric].mode)
        ranked.at[index, "best_epoch"] = summary["best_epoch"]
        for name in METRICS:
            ranked.at[index, f"at_best_{name}"] = summary[f"at_best_{name}"]
    return ranked


def best_trial(trials: pd.DataFrame, metric: str) -> pd.Series:
    """Return the trials row with the best value of ``metric``."""
    if trials.empty or trials[best_column(metric)].isna().all():
        raise ValueError(f"no trial has a value of {metric}; the experiment has no results yet")
    ordered = trials.sort_values(
        best_column(metric), ascending=_ascending(metric), na_position="last", kind="stable"
    )
    return ordered.iloc[0]


def _make_evaluator(name: str, seed: int):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name == "ped_anova":
        return PedAnovaImportanceEvaluator()
    if name == "fanova":
        return FanovaImportanceEvaluator(
            n_trees=FANOVA_TREES, max_depth=FANOVA_MAX_DEPTH, seed=seed
        )
    raise ValueError(
        f"unknown importance evaluator {name!r}; valid evaluators: "
        f"{', '.join(IMPORTANCE_EVALUATORS)}"
    )


def param_importances(
    study, evaluators: tuple[str, ...] = IMPORTANCE_EVALUATORS, seed: int = 0
) -> pd.DataFrame:
    """Compute Optuna's parameter importances of a study, one column per evaluator.

    ``ped_anova`` is Optuna's PedAnovaImportanceEvaluator (the default of Optuna 5; it
    scores conditional params such as a branch that only some trials take). ``fanova`` is
    FanovaImportanceEvaluator (a random forest of FANOVA_TREES trees of depth
    FANOVA_MAX_DEPTH, seeded by ``seed``), which scores only the
    params present in every completed trial. Importances of each evaluator sum to 1; a
    param an evaluator does not score is NaN. The target is the value each trial has in
    the study: for a study written by Ray's OptunaSearch, the sweep's metric at the
    trial's last reported epoch. The ``scored_trials`` column gives the number of
    COMPLETE trials the evaluators saw: with few of them the importances are noise.
    """
    import optuna

    columns: dict[str, dict[str, float]] = {}
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Optuna marks importance features experimental and warns about small studies.
            warnings.simplefilter("ignore")
            for name in evaluators:
                evaluator = _make_evaluator(name, seed)
                try:
                    values = optuna.importance.get_param_importances(study, evaluator=evaluator)
                except RuntimeError as error:
                    # fanova raises this when all trials have the same value (Optuna 5.1).
                    logger.warning("%s importances skipped: %s", name, error)
                    continue
                columns[name] = {param: float(value) for param, value in values.items()}
    finally:
        optuna.logging.set_verbosity(previous)
    table = pd.DataFrame(columns, columns=list(evaluators))
    table.index.name = "parameter"
    table = table.sort_values(list(evaluators)[0], ascending=False).reset_index()
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    table["scored_trials"] = len(completed)
    return table


def importance_gap(study, metric: str) -> str | None:
    """Return why a study's parameter importances are undefined, or None when they are not.

    Importances compare the values of COMPLETE trials, so they need two different ones.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    values = {trial.value for trial in complete}
    if not values:
        return "no trial has finished with a value"
    if len(values) == 1:
        return f"all {len(complete)} scored trials have {metric} = {values.pop():.4g}"
    return None


def study_with_best_values(study, trials: pd.DataFrame, metric: str):
    """Return an in-memory study whose trials carry their best value of ``metric``.

    Ray's OptunaSearch tells Optuna only a trial's value at its last epoch, and glo-search
    records trials that ASHA stopped as PRUNED, so importance on the stored study sees only
    the trials that ran to the end. Here every COMPLETE or PRUNED trial that carries a
    ``tune_trial_id`` found in ``trials`` becomes COMPLETE with that trial's
    ``best_<metric>`` from trials.parquet. Trials stopped early had fewer epochs to reach
    their best, so the importances also reflect which settings the scheduler stopped.
    """
    import optuna

    best = trials.set_index("trial_id")[best_column(metric)].dropna().to_dict()
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line
    try:
        copy = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(previous)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for trial in study.get_trials(deepcopy=False, states=states):
        value = best.get(trial.user_attrs.get("tune_trial_id"))
        if value is None or not math.isfinite(value):
            continue
        copy.add_trial(
            optuna.trial.create_trial(
                params=trial.params,
                distributions=trial.distributions,
                value=float(value),
                user_attrs=trial.user_attrs,
            )
        )
    return copy


def valid_epochs(epochs: pd.DataFrame) -> pd.DataFrame:
    """Return the trial-epochs that did not diverge (diverged ones hold worst values)."""
    if "diverged" not in epochs:
        return epochs
    return epochs[epochs["diverged"].fillna(0).astype(int) == 0]


def _spearman(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    from scipy.stats import spearmanr

    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan, math.nan
    result = spearmanr(x, y)
    if len(x) > EXACT_SPEARMAN_MAX_N:
        return float(result.statistic), float(result.pvalue)
    return float(result.statistic), _exact_spearman_p(x, y, float(result.statistic))


# Up to this many points the p-value is exact, because SciPy's (a t approximation) is far
# off there: 0 for three points in order, where the exact two-sided value is 1/3.
EXACT_SPEARMAN_MAX_N = 8


def _exact_spearman_p(x: pd.Series, y: pd.Series, rho: float) -> float:
    """Return the two-sided p-value of rho over every ordering of y (n! of them)."""
    from itertools import permutations

    from scipy.stats import rankdata

    rank_x = rankdata(x)
    rank_y = rankdata(y)
    orders = np.array(list(permutations(range(len(rank_y)))))
    shuffled = rank_y[orders]
    centred_x = rank_x - rank_x.mean()
    centred_y = shuffled - shuffled.mean(axis=1, keepdims=True)
    rhos = (
        centred_y
        @ centred_x
        / (np.sqrt((centred_y**2).sum(axis=1)) * np.sqrt((centred_x**2).sum()))
    )
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def loss_correlations(
    epochs: pd.DataFrame,
    metrics: tuple[str, ...] = ("disentanglement", "ideal_neighbour_accuracy"),
    loss: str = "recon_error",
    quantile: float = 0.25,
) -> pd.DataFrame:
    """Spearman correlation between ``loss`` and each metric over all trial-epochs.

    Returns one row per metric and subset: ``all`` (every trial-epoch that did not
    diverge) and ``lowest-loss quartile`` (those with ``loss`` at or below its
    ``quantile``). If a low loss picked good runs, the correlation would stay strong in
    the lowest-loss subset. A value near 0 there means that the loss cannot rank the runs
    that reconstruct well. Columns: metric, subset, n, spearman_rho, p_value, loss_threshold.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"invalid quantile={quantile}: must be in (0, 1]")
    rows = []
    data = valid_epochs(epochs)
    data = data[np.isfinite(data[loss])]
    threshold = float(data[loss].quantile(quantile)) if len(data) else math.nan
    subset_name = "lowest-loss quartile" if quantile == 0.25 else f"loss <= q{quantile:g}"
    for metric in metrics:
        _check_metric(metric)
        for subset, part in (("all", data), (subset_name, data[data[loss] <= threshold])):
            part = part[np.isfinite(part[metric])]
            rho, p_value = _spearman(part[loss], part[metric])
            rows.append(
                {
                    "metric": metric,
                    "subset": subset,
                    "n": len(part),
                    "spearman_rho": rho,
                    "p_value": p_value,
                    "loss_threshold": threshold if subset != "all" else math.nan,
                }
            )
    return pd.DataFrame(rows)


def asha_rungs(info: dict[str, Any], trials: pd.DataFrame | None = None) -> list[float]:
    """Return the rung milestones (epochs) of the sweep's ASHA scheduler.

    Taken from experiment.json's ``rungs`` when present, else computed as Ray's ASHA does
    from ``grace_period``, ``reduction_factor`` and ``max_epochs``
    (grace_period * reduction_factor**k for k = 0 .. floor(log(max/grace) / log(eta))),
    else read off the trials: the distinct epoch counts at which trials were stopped.
    """
    if info.get("rungs"):
        return sorted(float(r) for r in info["rungs"])
    grace, eta, max_t = (info.get(k) for k in ("grace_period", "reduction_factor", "max_epochs"))
    if grace and eta and max_t and eta > 1 and max_t >= grace:
        count = int(math.log(max_t / grace) / math.log(eta) + 1)
        return [float(grace * eta**k) for k in range(count)]
    if trials is None or trials.empty:
        return []
    stopped = trials.loc[trials["status"] == "stopped", "epochs_run"].dropna()
    return sorted(float(e) for e in stopped.unique())


def rung_survival(
    trials: pd.DataFrame, rungs: list[float], max_epochs: int | None
) -> pd.DataFrame:
    """Count the trials that reached each rung, and the trials that ran to max_epochs.

    Columns: milestone (epochs), kind (``rung`` or ``max_epochs``), reached (trials with
    at least that many epochs), share (of all trials).
    """
    milestones = [(float(r), "rung") for r in rungs]
    if max_epochs and all(m != max_epochs for m, _ in milestones):
        milestones.append((float(max_epochs), "max_epochs"))
    total = len(trials)
    rows = []
    for milestone, kind in sorted(milestones):
        reached = int((trials["epochs_run"].fillna(0) >= milestone).sum())
        rows.append(
            {
                "milestone": milestone,
                "kind": kind,
                "reached": reached,
                "share": reached / total if total else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["milestone", "kind", "reached", "share"])


def trial_epochs(epochs: pd.DataFrame, trial_id: str, experiment: str | None = None):
    rows = epochs[epochs["trial_id"] == trial_id]
    if experiment is not None and "experiment" in rows:
        rows = rows[rows["experiment"] == experiment]
    if rows.empty:
        raise ValueError(f"trial {trial_id!r} has no rows in the epochs table")
    return rows.sort_values("epoch")


def neighbour_history(epochs: pd.DataFrame, trial_id: str, experiment=None) -> pd.DataFrame:
    """Return each digit's nearest class code per epoch: index epoch, columns digits 0-9.

    Diverged epochs hold -1 for every digit.
    """
    rows = trial_epochs(epochs, trial_id, experiment)
    history = rows.set_index("epoch")[NEAREST_COLUMNS]
    history.columns = list(range(10))
    return history


def ideal_neighbour_table(
    epochs: pd.DataFrame, trial_id: str, epoch: int | None = None, experiment=None
) -> pd.DataFrame:
    """Return the ideal-neighbour check of one trial at one epoch (default: its last).

    Columns: digit, nearest (the digit whose class code is closest), ideal (the digits
    counted as right, from glo_search.metrics.IDEAL_NEIGHBOURS), hit. The share of hits
    is the epoch's ideal_neighbour_accuracy.
    """
    history = neighbour_history(epochs, trial_id, experiment)
    epoch = int(history.index.max()) if epoch is None else int(epoch)
    if epoch not in history.index:
        raise ValueError(f"trial {trial_id!r} has no epoch {epoch}; it has {list(history.index)}")
    nearest = history.loc[epoch]
    rows = []
    for digit in range(10):
        ideal = IDEAL_NEIGHBOURS.get(digit, ())
        rows.append(
            {
                "digit": digit,
                "nearest": int(nearest[digit]),
                "ideal": " ".join(str(d) for d in ideal),
                "hit": int(nearest[digit]) in ideal,
            }
        )
    return pd.DataFrame(rows)


OPERATORS = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
NEGATION = {"==": "!=", "!=": "==", ">=": "<", "<=": ">", ">": "<=", "<": ">="}
_SPLIT_PATTERN = re.compile(r"^\s*([A-Za-z_]\w*)\s*(==|!=|>=|<=|>|<|=)\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Split:
    """A two-way split of the trials by one comparison, such as ``content_decay > 0``."""

    column: str
    op: str
    value: Any

    @property
    def label(self) -> str:
        return (
            f"{self.column} {self.op} {self.value:g}"
            if isinstance(self.value, float)
            else f"{self.column} {self.op} {self.value}"
        )

    @property
    def negated_label(self) -> str:
        return Split(self.column, NEGATION[self.op], self.value).label

    def labels(self, trials: pd.DataFrame) -> pd.Series:
        """Return the label of the side of the split each trial falls on."""
        if self.column not in trials:
            raise ValueError(
                f"split {self.label!r} names column {self.column!r}, which the trials "
                f"table does not have; use a hyperparameter such as {', '.join(SEARCHED)}"
            )
        values = trials[self.column]
        if isinstance(self.value, str) and pd.api.types.is_numeric_dtype(values):
            raise ValueError(
                f"invalid split {self.label!r}: {self.column} contains numbers and "
                f"{self.value!r} is not a number"
            )
        if isinstance(self.value, float):
            values = pd.to_numeric(values, errors="coerce")
        inside = OPERATORS[self.op](values, self.value).fillna(False).astype(bool)
        return pd.Series(
            np.where(inside, self.label, self.negated_label), index=trials.index, name=self.label
        )


def parse_split(text: str) -> Split:
    """Parse ``COLUMN OP VALUE`` with OP one of == != >= <= > < (``=`` means ==)."""
    match = _SPLIT_PATTERN.match(text)
    if not match:
        raise ValueError(
            f"invalid split {text!r}: write COLUMN OP VALUE with OP one of "
            f"{', '.join(OPERATORS)}, for example 'content_decay > 0'"
        )
    column, op, raw = match.groups()
    op = "==" if op == "=" else op
    raw = raw.strip("'\"")
    if not raw or raw[0] in "<>=!":
        raise ValueError(
            f"invalid split {text!r}: {raw!r} is not a value; write COLUMN OP VALUE with OP "
            f"one of {', '.join(OPERATORS)}, for example 'content_decay > 0'"
        )
    try:
        value: Any = float(raw)
    except ValueError:
        value = raw
    return Split(column, op, value)


def default_splits(trials: pd.DataFrame) -> list[Split]:
    """Return ``content_decay > 0`` when the trials have both zero and positive values."""
    if "content_decay" in trials:
        values = trials["content_decay"]
        if (values == 0).any() and (values > 0).any():
            return [Split("content_decay", ">", 0.0)]
    return []


def variant_summary(trials: pd.DataFrame, by: str | Split, metric: str) -> pd.DataFrame:
    """Summarize the trials grouped by a column or a split.

    Columns: the group, trials, completed, stopped, failed (diverged or error), the best
    and the median of best_<metric>, then the median best value of every other metric,
    over the trials of the group that did not diverge.
    """
    _check_metric(metric)
    if isinstance(by, Split):
        groups = by.labels(trials)
        name = by.label
    else:
        if by not in trials:
            raise ValueError(f"cannot group by {by!r}: the trials table has no such column")
        groups = trials[by].astype(str)
        name = by
    rows = []
    for group, part in trials.groupby(groups, sort=True):
        scored = part[part["status"] != "diverged"]
        best = scored[best_column(metric)]
        row = {
            name: group,
            "trials": len(part),
            "completed": int((part["status"] == "completed").sum()),
            "stopped": int((part["status"] == "stopped").sum()),
            "failed": int(part["status"].isin(["diverged", "error"]).sum()),
            f"top_{metric}": best.min() if _ascending(metric) else best.max(),
            f"median_{metric}": best.median(),
        }
        for other in METRICS:
            if other != metric:
                row[f"median_{other}"] = scored[best_column(other)].median()
        rows.append(row)
    return pd.DataFrame(rows)
