"""The report of a small real sweep, checked against its Parquet files and Optuna study,
and rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from analysis import analyze
from glo_search.metrics import IDEAL_NEIGHBOURS

SECTIONS = {
    "best": "Best trials",
    "importance": "Parameter importance",
    "loss": "Metric against loss",
    "curves": "Learning curves",
    "rungs": "ASHA rungs",
    "params": "Metrics against hyperparameters",
    "neighbours": "Class-code neighbours",
    "probes": "Probe galleries",
    "variants": "Variant comparison",
}
IMAGE_PATTERN = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def report(small_experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return analyze(small_experiment, out, top=3)


@pytest.fixture(scope="module")
def parquet(small_experiment):
    return (
        pd.read_parquet(small_experiment / "trials.parquet"),
        pd.read_parquet(small_experiment / "epochs.parquet"),
    )


def test_report_has_every_section(report):
    page = report.read_text()
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in page


def test_report_is_self_contained(report):
    page = report.read_text()
    images = IMAGE_PATTERN.findall(page)
    figures = list(report.parent.glob("*.png"))
    assert len(figures) >= 6  # importance, loss, curves, rungs, params, neighbours
    gallery = re.findall(r'<img [^>]*alt="best/', page)
    assert gallery  # trials write probe images at each new best epoch
    assert len(images) == len(figures) + len(gallery)
    for encoded in images:
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).format == "PNG"
    assert "http://" not in page
    assert "https://" not in page
    assert re.findall(r'src="(?!data:)', page) == []


def test_best_trials_match_parquet(report, parquet):
    trials, _ = parquet
    table = pd.read_csv(report.parent / "best_trials.csv", dtype={"trial_id": str})
    expected = trials.sort_values("best_disentanglement", ascending=False, kind="stable")
    assert table["trial_id"].tolist() == expected["trial_id"].tolist()
    merged = table.merge(trials, on="trial_id", suffixes=("", "_parquet"))
    for column in ("best_disentanglement", "at_best_recon_error", "at_best_content_leakage"):
        np.testing.assert_allclose(merged[column], merged[f"{column}_parquet"])
    assert merged["best_epoch"].tolist() == merged["best_epoch_parquet"].tolist()
    assert merged["status"].tolist() == merged["status_parquet"].tolist()


def test_loss_correlation_matches_parquet(report, parquet):
    _, epochs = parquet
    table = pd.read_csv(report.parent / "loss_correlation.csv").set_index(["metric", "subset"])
    valid = epochs[epochs["diverged"] == 0]
    row = table.loc[("disentanglement", "all")]
    assert row["n"] == len(valid)
    rho = spearmanr(valid["recon_error"], valid["disentanglement"]).statistic
    assert row["spearman_rho"] == pytest.approx(rho)
    quartile = table.loc[("disentanglement", "lowest-loss quartile")]
    assert quartile["n"] == (valid["recon_error"] <= valid["recon_error"].quantile(0.25)).sum()


def test_rungs_match_experiment(report, parquet, small_experiment):
    trials, _ = parquet
    info = json.loads((small_experiment / "experiment.json").read_text())
    assert info["grace_period"] == 1
    assert info["reduction_factor"] == 2
    assert info["rungs"] == [1.0, 2.0]
    table = pd.read_csv(report.parent / "rungs.csv")
    assert table["milestone"].tolist() == [1.0, 2.0, 3.0]
    expected = [int((trials["epochs_run"] >= m).sum()) for m in (1, 2, 3)]
    assert table["reached"].tolist() == expected


def test_ideal_neighbours_match_parquet(report, parquet):
    trials, epochs = parquet
    best = trials.sort_values("best_disentanglement", ascending=False).iloc[0]
    row = epochs[
        (epochs["trial_id"] == best["trial_id"]) & (epochs["epoch"] == best["best_epoch"])
    ]
    table = pd.read_csv(report.parent / "ideal_neighbours.csv")
    assert table["nearest"].tolist() == [int(row[f"nearest_{d}"].iloc[0]) for d in range(10)]
    hits = [n in IDEAL_NEIGHBOURS[d] for d, n in enumerate(table["nearest"])]
    assert table["hit"].tolist() == hits
    # The trainer's own ideal_neighbour_accuracy at that epoch is the share of hits.
    assert table["hit"].mean() == pytest.approx(row["ideal_neighbour_accuracy"].iloc[0])


def test_importance_scores_every_finished_trial(report, small_experiment, parquet):
    study = optuna.load_study(
        study_name="small", storage=f"sqlite:///{small_experiment / 'optuna.db'}"
    )
    finished = study.get_trials(
        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    trials, _ = parquet
    table = pd.read_csv(report.parent / "importance.csv")
    # Pruned trials count with their best value from trials.parquet.
    assert (table["scored_trials"] == len(finished)).all()
    assert len(finished) == len(trials)
    assert {"class_dim", "content_dim", "noise_std"} <= set(table["parameter"])
    assert table["ped_anova"].sum() == pytest.approx(1.0)


def chromium_screenshot(page, shot, tmp_path, height: int = 7000) -> Image.Image:
    """Render an HTML file with headless Chromium, offline, and return the screenshot."""
    command = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size=1280,{height}",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return Image.open(shot).convert("RGB")


def plot_blue_pixels(image: Image.Image) -> int:
    """Count pixels near matplotlib's default first colour (31, 119, 180), tab:blue.

    The page's own styles use no such colour, so these pixels come from rendered plots.
    """
    pixels = np.asarray(image).astype(int)
    distance = np.abs(pixels - np.array([31, 119, 180])).sum(axis=2)
    return int((distance < 40).sum())


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium not installed (Debian: apt-get install chromium)",
)
def test_report_renders_in_chromium(report, tmp_path):
    rendered = plot_blue_pixels(chromium_screenshot(report, tmp_path / "report.png", tmp_path))
    # Control: the same page with every image replaced by an empty data URI.
    broken = tmp_path / "broken.html"
    broken.write_text(IMAGE_PATTERN.sub('src="data:image/png;base64,"', report.read_text()))
    control = plot_blue_pixels(chromium_screenshot(broken, tmp_path / "broken.png", tmp_path))
    assert control < 100
    assert rendered > 5000
