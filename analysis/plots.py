"""The report's figures, drawn with matplotlib's object-oriented API.

Each function returns a ``matplotlib.figure.Figure`` and leaves pyplot's global state
alone, so scripts and notebooks can call them with any backend. ``save_png`` renders a
figure with the Agg renderer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.tables import best_column, valid_epochs
from glo_search.metrics import IDEAL_NEIGHBOURS, METRICS

STATUS_COLOURS = {
    "completed": "tab:blue",
    "stopped": "tab:orange",
    "running": "tab:green",
    "diverged": "tab:red",
    "error": "tab:gray",
}
# Above this many epochs the neighbour heatmap drops the digit written in each cell.
MAX_ANNOTATED_EPOCHS = 40


def save_png(figure: Figure, path: str | Path | None = None, dpi: int = 100) -> bytes:
    """Render a figure as PNG, write it to ``path`` if given, and return the bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _empty(message: str) -> Figure:
    figure = Figure(figsize=(6, 1.2))
    axes = figure.add_subplot()
    axes.axis("off")
    axes.text(0.5, 0.5, message, ha="center", va="center")
    return figure


def plot_importances(importances: pd.DataFrame, metric: str) -> Figure:
    """Plot horizontal bars of each parameter's importance, one bar per evaluator."""
    evaluators = [c for c in importances.columns if c not in ("parameter", "scored_trials")]
    if importances.empty:
        return _empty("no parameter importances: the study has no completed trials")
    figure = Figure(figsize=(6.5, 0.5 + 0.45 * len(importances) * max(1, len(evaluators)) / 1.5))
    axes = figure.add_subplot()
    positions = np.arange(len(importances))
    height = 0.8 / max(1, len(evaluators))
    for k, name in enumerate(evaluators):
        axes.barh(positions + k * height, importances[name].fillna(0), height, label=name)
    axes.set_yticks(positions + height * (len(evaluators) - 1) / 2)
    axes.set_yticklabels(importances["parameter"])
    axes.invert_yaxis()
    axes.set_xlabel(f"importance for {metric} (each evaluator sums to 1)")
    axes.legend(loc="lower right")
    return figure


def plot_metric_vs_loss(
    epochs: pd.DataFrame,
    correlations: pd.DataFrame,
    metrics: tuple[str, ...] = ("disentanglement", "ideal_neighbour_accuracy"),
    loss: str = "recon_error",
) -> Figure:
    """Plot each metric against the loss over all trial-epochs, lowest quartile shaded."""
    data = valid_epochs(epochs)
    # Many points need small translucent markers; a few need visible ones.
    size, alpha = (4, 0.25) if len(data) > 2000 else (14, 0.7)
    figure = Figure(figsize=(5.2 * len(metrics), 4.2))
    for k, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), k + 1)
        axes.scatter(
            data[loss],
            data[metric],
            s=size,
            alpha=alpha,
            c="tab:blue",
            linewidths=0,
            rasterized=True,
        )
        rows = correlations[correlations["metric"] == metric].set_index("subset")
        threshold = rows["loss_threshold"].dropna()
        if len(threshold) and np.isfinite(threshold.iloc[0]):
            axes.axvspan(data[loss].min(), threshold.iloc[0], color="tab:green", alpha=0.12)
        axes.set_xlabel(f"{loss} (lower is better)")
        axes.set_ylabel(
            f"{metric} ({'higher' if METRICS[metric].mode == 'max' else 'lower'} is better)"
        )
        title = [
            f"{subset}: rho={row.spearman_rho:.2f} (n={row.n})" for subset, row in rows.iterrows()
        ]
        axes.set_title("\n".join(title), fontsize=9)
    figure.suptitle("Metric against loss over trial-epochs (shaded: lowest-loss quartile)")
    figure.tight_layout()
    return figure


def plot_learning_curves(
    curves: dict[str, pd.DataFrame], metrics: tuple[str, ...] = tuple(METRICS)
) -> Figure:
    """Plot one panel per metric with a line per trial over the epochs.

    ``curves`` maps a trial's label to its rows of the epochs table.
    """
    columns = 3
    rows = int(np.ceil(len(metrics) / columns))
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows))
    for k, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, k + 1)
        for label, curve in curves.items():
            curve = curve.sort_values("epoch")
            axes.plot(curve["epoch"], curve[metric], marker=".", label=label)
        axes.set_title(metric, fontsize=10)
        axes.set_xlabel("epoch")
    figure.axes[0].legend(fontsize=7, title="trial", title_fontsize=7)
    figure.tight_layout()
    return figure


def plot_rung_survival(survival: pd.DataFrame) -> Figure:
    """Plot the number of trials that reached each rung and max_epochs."""
    if survival.empty:
        return _empty("no rungs: the sweep's scheduler has none and no trial was stopped")
    figure = Figure(figsize=(6, 3.2))
    axes = figure.add_subplot()
    labels = [
        f"{m:g}" + (" (max)" if kind == "max_epochs" else "")
        for m, kind in zip(survival["milestone"], survival["kind"], strict=True)
    ]
    colours = ["tab:blue" if kind == "rung" else "tab:green" for kind in survival["kind"]]
    bars = axes.bar(labels, survival["reached"], color=colours)
    axes.bar_label(
        bars,
        labels=[
            f"{r} ({s:.0%})" for r, s in zip(survival["reached"], survival["share"], strict=True)
        ],
    )
    axes.set_xlabel("epochs (rung milestone)")
    axes.set_ylabel("trials that reached it")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of trials
    axes.margins(y=0.15)
    return figure


def _categorical_positions(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    categories = sorted(values.astype(str).unique())
    index = {c: k for k, c in enumerate(categories)}
    return np.array([index[v] for v in values.astype(str)]), categories


def plot_metrics_vs_params(
    trials: pd.DataFrame,
    params: list[str],
    scales: dict[str, str],
    metrics: tuple[str, ...] = tuple(METRICS),
) -> Figure:
    """Plot each trial's best value of each metric (rows) against each param (columns).

    Points are coloured by status. A numeric param is drawn on its value axis, logarithmic
    where ``scales`` maps it to ``log`` or ``symlog``; other params get one tick per value.
    """
    if not params:
        return _empty("no hyperparameter varies across the trials")
    figure = Figure(figsize=(3.0 * len(params), 2.3 * len(metrics)))
    colours = trials["status"].map(STATUS_COLOURS).fillna("black")
    for row, metric in enumerate(metrics):
        for column, param in enumerate(params):
            axes = figure.add_subplot(len(metrics), len(params), row * len(params) + column + 1)
            values = trials[param]
            if values.dtype == bool or not pd.api.types.is_numeric_dtype(values):
                positions, categories = _categorical_positions(values)
                axes.scatter(positions, trials[best_column(metric)], s=10, c=colours)
                axes.set_xticks(range(len(categories)))
                axes.set_xticklabels(categories, fontsize=7, rotation=30)
            else:
                axes.scatter(values, trials[best_column(metric)], s=10, c=colours)
                _set_scale(axes, scales.get(param, "linear"), values)
            if row == len(metrics) - 1:
                axes.set_xlabel(param)
            if column == 0:
                axes.set_ylabel(f"best {metric}", fontsize=8)
            axes.tick_params(labelsize=7)
    handles = [
        figure.axes[0].scatter([], [], c=colour, s=10, label=status)
        for status, colour in STATUS_COLOURS.items()
        if (trials["status"] == status).any()
    ]
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    # Fixed margins: tight_layout over this many panels takes seconds.
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.06, top=0.95, wspace=0.3, hspace=0.35)
    return figure


def _set_scale(axes, scale: str, values: pd.Series) -> None:
    if scale == "log":
        axes.set_xscale("log")
        positive = values[values > 0]
        if len(positive) and positive.max() < 1000 * positive.min():
            # Within three decades, one label per power of ten leaves one or two labels,
            # so class_dim 2-64 showed only "10^1". Label 1, 2 and 5 of each decade.
            axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    elif scale == "symlog":
        positive = values[values > 0]
        axes.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    if scale != "linear":
        # Labels on minor log ticks overlap in narrow panels.
        axes.xaxis.set_minor_formatter(NullFormatter())


def plot_neighbours(history: pd.DataFrame, title: str = "") -> Figure:
    """Plot a heatmap of each digit's nearest class code over the epochs: green where ideal.

    ``history`` is ``analysis.tables.neighbour_history``: index epoch, columns digits.
    """
    epochs = list(history.index)
    # cell states: 0 diverged (no codes), 1 nearest not ideal, 2 nearest ideal
    states = np.zeros((10, len(epochs)), dtype=int)
    for j, epoch in enumerate(epochs):
        for digit in range(10):
            nearest = int(history.loc[epoch, digit])
            if nearest >= 0:
                states[digit, j] = 2 if nearest in IDEAL_NEIGHBOURS.get(digit, ()) else 1
    figure = Figure(figsize=(min(14, 2 + 0.35 * len(epochs)), 4))
    axes = figure.add_subplot()
    colours = ListedColormap(["#dddddd", "#f4a6a6", "#9ed99e"])
    axes.imshow(states, aspect="auto", cmap=colours, vmin=0, vmax=2, interpolation="nearest")
    if len(epochs) <= MAX_ANNOTATED_EPOCHS:
        for j, epoch in enumerate(epochs):
            for digit in range(10):
                nearest = int(history.loc[epoch, digit])
                axes.text(
                    j,
                    digit,
                    "" if nearest < 0 else str(nearest),
                    ha="center",
                    va="center",
                    fontsize=8,
                )
    step = max(1, len(epochs) // 20)
    axes.set_xticks(range(0, len(epochs), step))
    axes.set_xticklabels([str(e) for e in epochs[::step]], fontsize=8)
    axes.set_yticks(range(10))
    axes.set_xlabel("epoch")
    axes.set_ylabel("digit")
    axes.set_title(
        title or "nearest class code per digit (green: an ideal neighbour)", fontsize=10
    )
    return figure


def plot_variants(trials: pd.DataFrame, groups: pd.Series, metric: str, title: str) -> Figure:
    """Plot best_<metric> of each group of trials as a box with its points."""
    scored = trials[trials["status"] != "diverged"]
    labels = sorted(groups.loc[scored.index].astype(str).unique())
    figure = Figure(figsize=(max(4.0, 1.4 * len(labels) + 1.5), 3.4))
    axes = figure.add_subplot()
    data = [
        scored.loc[groups.loc[scored.index].astype(str) == g, best_column(metric)].dropna()
        for g in labels
    ]
    axes.boxplot(data, tick_labels=labels, showfliers=False)
    for k, values in enumerate(data):
        jitter = np.random.default_rng(k).uniform(-0.12, 0.12, len(values))
        axes.scatter(np.full(len(values), k + 1) + jitter, values, s=10, alpha=0.6)
    axes.set_ylabel(f"best {metric}")
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="x", labelsize=8, rotation=15)
    return figure
