from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from glo_search.plots import class_neighbours, plot_class_neighbours, save_figure


def epochs_table(trial_ids=("a",), num_epochs=4) -> pd.DataFrame:
    rows = []
    for trial_index, trial_id in enumerate(trial_ids):
        for epoch in range(num_epochs, 0, -1):  # unsorted on purpose
            nearest = {f"nearest_{k}": (k + epoch + trial_index) % 10 for k in range(10)}
            nearest["nearest_0"] = -1 if epoch == 2 else 8  # epoch 2 diverged
            rows.append({"trial_id": trial_id, "epoch": epoch, **nearest})
    return pd.DataFrame(rows)


def test_class_neighbours_rows_are_digits_columns_epochs():
    nearest = class_neighbours(epochs_table())
    assert nearest.shape == (10, 4)
    assert nearest[3].tolist() == [(3 + epoch) % 10 for epoch in range(1, 5)]


def test_class_neighbours_picks_trial():
    nearest = class_neighbours(epochs_table(("a", "b")), trial_id="b")
    assert nearest[3, 0] == (3 + 1 + 1) % 10


def test_class_neighbours_needs_trial_of_sweep():
    with pytest.raises(ValueError, match="pass trial_id, one of a, b"):
        class_neighbours(epochs_table(("a", "b")))


def test_class_neighbours_unknown_trial():
    with pytest.raises(ValueError, match="trial 'c' not in"):
        class_neighbours(epochs_table(("a", "b")), trial_id="c")


def test_class_neighbours_single_run_table():
    table = epochs_table().drop(columns="trial_id")
    assert class_neighbours(table).shape == (10, 4)


def test_class_neighbours_missing_column():
    with pytest.raises(ValueError, match="nearest_9"):
        class_neighbours(epochs_table().drop(columns="nearest_9"))


@pytest.mark.parametrize("num_epochs", [4, 60], ids=["annotated", "too-many-to-annotate"])
def test_plot_class_neighbours_writes_png(tmp_path, num_epochs):
    figure = plot_class_neighbours(epochs_table(num_epochs=num_epochs))
    axes = figure.axes[0]
    assert axes.get_xlabel() == "epoch"
    assert [label.get_text() for label in axes.get_yticklabels()][1] == "1 (4 7)"
    path = tmp_path / "neighbours.png"
    save_figure(figure, path)
    assert np.asarray(Image.open(path)).shape[0] > 100


def test_plot_marks_ideal_neighbours_bold():
    figure = plot_class_neighbours(epochs_table(num_epochs=4))
    texts = {(t.get_position(), t.get_text()): t for t in figure.axes[0].texts}
    # Digit 0 has nearest 8 (ideal) at epoch 1 (column 0), and no text at diverged epoch 2.
    assert texts[((0, 0), "8")].get_fontweight() == "bold"
    assert not any(position == (1, 0) for position, _ in texts)
