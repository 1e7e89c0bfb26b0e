"""PNG plots of training results, drawn with matplotlib's Agg renderer (no display needed).

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so plotting
leaves no global state behind and works in Ray workers and without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glo_search.io import atomic_write
from glo_search.metrics import IDEAL_NEIGHBOURS

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

NEAREST_COLUMNS = tuple(f"nearest_{k}" for k in range(10))
MAX_ANNOTATED_EPOCHS = 40  # beyond this the digits in the cells become unreadable


def class_neighbours(epochs: pd.DataFrame, trial_id: str | None = None) -> np.ndarray:
    """Return the (10, E) nearest classes of one run: row k is nearest_k per epoch.

    ``epochs`` is an epochs.parquet table. A sweep's table contains several trials, so
    ``trial_id`` must pick one. A single run's table (no ``trial_id`` column) needs none.
    Columns are sorted by epoch.
    """
    rows = epochs
    if "trial_id" in epochs.columns:
        trial_ids = sorted(epochs["trial_id"].unique())
        if trial_id is None and len(trial_ids) > 1:
            raise ValueError(
                f"epochs table contains {len(trial_ids)} trials; pass trial_id, "
                f"one of {', '.join(trial_ids)}"
            )
        if trial_id is not None:
            if trial_id not in trial_ids:
                raise ValueError(
                    f"trial {trial_id!r} not in the epochs table; trials: {', '.join(trial_ids)}"
                )
            rows = epochs[epochs["trial_id"] == trial_id]
    missing = [column for column in ("epoch", *NEAREST_COLUMNS) if column not in rows.columns]
    if missing:
        raise ValueError(
            f"epochs table has no column {missing[0]!r}; pass a table read from epochs.parquet"
        )
    rows = rows.sort_values("epoch")
    return rows[list(NEAREST_COLUMNS)].to_numpy(dtype=int).T  # (10, E)


def plot_class_neighbours(
    epochs: pd.DataFrame,
    trial_id: str | None = None,
    ideal: Mapping[int, Sequence[int]] = IDEAL_NEIGHBOURS,
    title: str | None = None,
) -> Figure:
    """Draw each digit's nearest class code against epoch, one row per digit.

    A cell's colour and number give the digit whose class code is nearest to the row's
    digit at that epoch, so a row that settles shows one colour. Numbers of neighbours in
    ``ideal`` are bold black, others dark red. A diverged epoch (nearest -1) stays blank.
    Row labels list each digit's ideal neighbours.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    nearest = class_neighbours(epochs, trial_id)  # (10, E)
    epoch_numbers = _epochs(epochs, trial_id)
    num_epochs = nearest.shape[1]
    figure = Figure(figsize=(max(6.0, 0.28 * num_epochs + 2.5), 4.8), layout="constrained")
    axes = figure.add_subplot()
    # tab10 lightened halfway to white, so the numbers on it stay readable.
    cmap = ListedColormap([[0.5 + 0.5 * c for c in rgb] for rgb in colormaps["tab10"].colors])
    masked = np.ma.masked_less(nearest, 0)
    image = axes.imshow(masked, cmap=cmap, vmin=-0.5, vmax=9.5, aspect="auto")
    if num_epochs <= MAX_ANNOTATED_EPOCHS:
        _annotate(axes, nearest, ideal)
    axes.set_yticks(range(10))
    axes.set_yticklabels([_row_label(k, ideal) for k in range(10)])
    step = max(1, num_epochs // 20)
    ticks = list(range(0, num_epochs, step))
    axes.set_xticks(ticks)
    axes.set_xticklabels([str(epoch_numbers[i]) for i in ticks])
    axes.set_xlabel("epoch")
    axes.set_ylabel("digit (ideal neighbours)")
    axes.set_title(title or "nearest class code of each digit")
    colorbar = figure.colorbar(image, ax=axes, ticks=range(10))
    colorbar.set_label("nearest digit")
    return figure


def _epochs(epochs: pd.DataFrame, trial_id: str | None) -> list[int]:
    rows = epochs if trial_id is None else epochs[epochs["trial_id"] == trial_id]
    return sorted(int(e) for e in rows["epoch"])


def _row_label(digit: int, ideal: Mapping[int, Sequence[int]]) -> str:
    neighbours = " ".join(str(k) for k in ideal.get(digit, ()))
    return f"{digit} ({neighbours})" if neighbours else str(digit)


def _annotate(axes, nearest: np.ndarray, ideal: Mapping[int, Sequence[int]]) -> None:
    for digit, row in enumerate(nearest):
        for column, neighbour in enumerate(row):
            if neighbour < 0:
                continue
            is_ideal = neighbour in ideal.get(digit, ())
            axes.text(
                column,
                digit,
                str(neighbour),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if is_ideal else "darkred",
                fontweight="bold" if is_ideal else "normal",
            )


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> None:
    """Write a figure as a PNG file, atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
