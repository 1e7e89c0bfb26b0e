"""The one-line summary of a sweep's best trial that `glo-search sweep` prints."""

from __future__ import annotations

import pandas as pd
import pytest

from glo_search.results import best_trial_summary

EPOCHS = pd.DataFrame(
    [
        {"trial_id": t, "epoch": e, "recon_error": r, "disentanglement": d}
        for t, e, r, d in (
            ("a", 2, 0.30, 0.10),
            ("a", 6, 0.10, 0.50),
            ("b", 2, 0.25, 0.05),
            ("b", 6, 0.05, 0.20),
        )
    ]
)


def _trials(metric: str, best: dict[str, float], best_epoch: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"trial_id": t, f"best_{metric}": best[t], "best_epoch": best_epoch[t]} for t in best]
    )


@pytest.mark.parametrize(
    ("metric", "best", "expected"),
    [
        (
            "disentanglement",
            {"a": 0.50, "b": 0.20},
            "best trial a: disentanglement=0.5000 at epoch 6; recon_error 0.1000 there, "
            "0.3000 at epoch 2, the first evaluated",
        ),
        (
            # The line does not repeat the metric it ranks by.
            "recon_error",
            {"a": 0.10, "b": 0.05},
            "best trial b: recon_error=0.0500 at epoch 6; disentanglement 0.2000 there, "
            "0.0500 at epoch 2, the first evaluated",
        ),
    ],
)
def test_best_trial_summary(metric, best, expected):
    trials = _trials(metric, best, {"a": 6, "b": 6})
    assert best_trial_summary(trials, EPOCHS, metric) == expected


def test_best_trial_summary_without_results():
    trials = _trials("disentanglement", {"a": None}, {"a": None})
    assert best_trial_summary(trials, EPOCHS, "disentanglement") == "no trial reported a result"
