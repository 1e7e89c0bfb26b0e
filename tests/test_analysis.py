"""Analysis functions on constructed data with known results, and the report on a
synthetic experiment folder."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

import analysis
from analysis import plots, tables
from analysis.probes import probe_images, trial_folder
from analysis.synthetic import write_experiment
from glo_search.cli import main
from glo_search.metrics import IDEAL_NEIGHBOURS

ROOT = Path(__file__).resolve().parents[1]


def epochs_frame(loss, metric, diverged=None) -> pd.DataFrame:
    count = len(loss)
    return pd.DataFrame(
        {
            "trial_id": [f"t{k}" for k in range(count)],
            "epoch": 1,
            "recon_error": loss,
            "disentanglement": metric,
            "ideal_neighbour_accuracy": metric,
            "diverged": diverged if diverged is not None else [0] * count,
        }
    )


# --- Spearman correlation against the loss ---------------------------------------------


def test_loss_correlation_monotone_is_minus_one():
    loss = np.linspace(0.1, 0.5, 40)
    metric = np.exp(-10 * loss)  # strictly decreasing, far from linear
    result = tables.loss_correlations(epochs_frame(loss, metric)).set_index(["metric", "subset"])
    all_rho = result.loc[("disentanglement", "all"), "spearman_rho"]
    low_rho = result.loc[("disentanglement", "lowest-loss quartile"), "spearman_rho"]
    assert all_rho == pytest.approx(-1.0)
    assert low_rho == pytest.approx(-1.0)


def test_loss_correlation_quartile_without_signal():
    # Losses 1..16: the lowest quartile is 1..4. Metric ranks 2, 4, 1, 3 there give
    # sum d^2 = 10 = n(n^2 - 1) / 6, so Spearman's rho is exactly 0; above the quartile
    # the metric falls as the loss rises.
    loss = np.arange(1.0, 17.0)
    metric = np.concatenate([[0.92, 0.94, 0.91, 0.93], np.linspace(0.8, 0.1, 12)])
    result = tables.loss_correlations(epochs_frame(loss, metric)).set_index(["metric", "subset"])
    low = result.loc[("disentanglement", "lowest-loss quartile")]
    everything = result.loc[("disentanglement", "all")]
    assert low["n"] == 4
    assert low["loss_threshold"] == pytest.approx(4.75)
    assert low["spearman_rho"] == pytest.approx(0.0, abs=1e-12)
    assert everything["n"] == 16
    assert everything["spearman_rho"] < -0.9


def test_loss_correlation_skips_diverged_epochs():
    loss = [0.1, 0.2, 0.3, 0.4, 5.0]
    metric = [0.9, 0.7, 0.5, 0.3, 0.9]  # the diverged row would break the monotone order
    frame = epochs_frame(loss, metric, diverged=[0, 0, 0, 0, 1])
    result = tables.loss_correlations(frame).set_index(["metric", "subset"])
    assert result.loc[("disentanglement", "all"), "n"] == 4
    assert result.loc[("disentanglement", "all"), "spearman_rho"] == pytest.approx(-1.0)


def test_loss_correlation_too_few_points_is_nan():
    result = tables.loss_correlations(epochs_frame([0.1, 0.2], [0.5, 0.4]))
    assert result["spearman_rho"].isna().all()


def test_loss_correlation_exact_p_for_few_points():
    # Of the 3! orderings of three metric values, two give |rho| = 1: p = 2/6. Of the 5!
    # orderings of five, 10 give |rho| >= 0.9: p = 10/120 (Spearman's exact table).
    three = tables.loss_correlations(epochs_frame([0.1, 0.2, 0.3], [0.9, 0.8, 0.7]))
    assert three.loc[0, "spearman_rho"] == pytest.approx(-1.0)
    assert three.loc[0, "p_value"] == pytest.approx(1 / 3)
    five = tables.loss_correlations(epochs_frame([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.5, 0.4]))
    assert five.loc[0, "spearman_rho"] == pytest.approx(0.9)
    assert five.loc[0, "p_value"] == pytest.approx(10 / 120)


@pytest.mark.parametrize("quantile", [0.0, -0.1, 1.5])
def test_loss_correlation_rejects_quantile(quantile):
    with pytest.raises(ValueError, match="quantile"):
        tables.loss_correlations(epochs_frame([0.1, 0.2, 0.3], [1, 2, 3]), quantile=quantile)


# --- parameter importance ---------------------------------------------------------------


def make_study(objective, trials: int = 80) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.optimize(objective, n_trials=trials)
    return study


@pytest.mark.parametrize("evaluator", tables.IMPORTANCE_EVALUATORS)
@pytest.mark.parametrize("important", ["x", "y"])
def test_importance_finds_the_only_parameter(evaluator, important):
    def objective(trial):
        values = {"x": trial.suggest_float("x", 0, 1), "y": trial.suggest_float("y", 0, 1)}
        trial.suggest_float("z", 0, 1)
        return values[important]

    result = tables.param_importances(make_study(objective), (evaluator,)).set_index("parameter")
    assert result.loc[important, evaluator] > 0.9
    assert result[evaluator].sum() == pytest.approx(1.0)
    assert result.index[0] == important
    assert (result["scored_trials"] == 80).all()


def test_importance_conditional_parameter():
    def objective(trial):
        if trial.suggest_categorical("branch", [False, True]):
            return 10 * trial.suggest_float("inner", 0, 1)
        return 0.0

    result = tables.param_importances(make_study(objective)).set_index("parameter")
    assert result.loc["inner", "ped_anova"] > 0
    assert math.isnan(result.loc["inner", "fanova"])  # fANOVA needs it in every trial
    assert result.loc["branch", "fanova"] == pytest.approx(1.0)


def test_importance_of_equal_values_is_nan():
    # fANOVA raises on a study whose trials all have the same value, e.g. all diverged.
    def objective(trial):
        trial.suggest_int("class_dim", 2, 64)
        return 0.0

    study = make_study(objective, trials=3)
    result = tables.param_importances(study).set_index("parameter")
    assert result["fanova"].isna().all()
    assert (result["scored_trials"] == 3).all()
    # The report shows this reason in place of the table.
    assert tables.importance_gap(study, "disentanglement") == (
        "all 3 scored trials have disentanglement = 0"
    )


def test_importance_gap_none_for_varied_values():
    study = make_study(lambda trial: trial.suggest_float("x", 0, 1), trials=3)
    assert tables.importance_gap(study, "x") is None
    assert tables.importance_gap(optuna.create_study(), "x") == (
        "no trial has finished with a value"
    )


def test_importance_rejects_unknown_evaluator():
    study = make_study(lambda trial: trial.suggest_float("x", 0, 1), trials=3)
    with pytest.raises(ValueError, match="unknown importance evaluator 'shap'"):
        tables.param_importances(study, ("shap",))


# --- ASHA rungs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grace", "eta", "max_epochs"),
    [(2, 3, 20), (1, 2, 3), (1, 3, 100), (4, 4, 64), (5, 2, 5)],
)
def test_asha_rungs_match_ray(grace, eta, max_epochs):
    from glo_search.search import make_scheduler, scheduler_settings

    recorded = scheduler_settings(make_scheduler("asha", max_epochs, grace, eta))
    info = {"grace_period": grace, "reduction_factor": eta, "max_epochs": max_epochs}
    assert tables.asha_rungs(info) == recorded["rungs"]
    assert tables.asha_rungs({**info, "rungs": recorded["rungs"]}) == recorded["rungs"]


def test_asha_rungs_from_stopped_trials():
    trials = pd.DataFrame(
        {"status": ["stopped", "stopped", "completed", "stopped"], "epochs_run": [2, 6, 20, 2]}
    )
    assert tables.asha_rungs({"max_epochs": 20}, trials) == [2.0, 6.0]


def test_rung_survival_counts():
    trials = pd.DataFrame({"epochs_run": [1, 2, 2, 6, 6, 6, 18, 20]})
    survival = tables.rung_survival(trials, [2.0, 6.0, 18.0], max_epochs=20)
    assert survival["milestone"].tolist() == [2.0, 6.0, 18.0, 20.0]
    assert survival["kind"].tolist() == ["rung", "rung", "rung", "max_epochs"]
    assert survival["reached"].tolist() == [7, 5, 2, 1]
    assert survival["share"].tolist() == [7 / 8, 5 / 8, 2 / 8, 1 / 8]


def test_rung_survival_plot_counts_whole_trials():
    trials = pd.DataFrame({"epochs_run": [2] * 12 + [6] * 2 + [20] * 2})
    survival = tables.rung_survival(trials, [2.0, 6.0], max_epochs=20)
    figure = plots.plot_rung_survival(survival)
    figure.canvas.draw()
    ticks = figure.axes[0].get_yticks()
    assert all(tick == int(tick) for tick in ticks), ticks


# --- tables of trials ---------------------------------------------------------------------


def trials_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e"],
            "status": ["completed", "stopped", "diverged", "completed", "stopped"],
            "class_dim": [5, 10, 5, 25, 10],
            "content_dim": [25, 25, 25, 25, 25],
            "noise_std": [0.3, 0.001, 100.0, 1.0, 3.0],
            "content_decay": [0.0, 0.1, 0.0, 0.5, 0.0],
            "loss": ["l1", "l2", "l1", "l1", "l2"],
            "best_epoch": [4, 2, 1, 5, 2],
            "epochs_run": [6, 2, 1, 6, 2],
            "best_disentanglement": [0.4, 0.1, 0.0, 0.6, np.nan],
            "best_recon_error": [0.2, 0.3, 1.0, 0.25, 0.1],
            "best_ideal_neighbour_accuracy": [0.5, 0.1, 0.0, 0.7, 0.3],
            "best_class_fidelity": [0.8, 0.2, 0.0, 0.9, 0.3],
            "best_style_transfer": [0.5, 0.5, 0.0, 0.66, 0.3],
            "best_content_leakage": [0.2, 0.5, 1.0, 0.15, 0.3],
        }
    )


def test_best_trials_order_and_columns():
    best = tables.best_trials(trials_frame(), "disentanglement", top=3)
    assert best["trial_id"].tolist() == ["d", "a", "b"]
    assert best.columns[:4].tolist() == ["trial_id", "status", "class_dim", "noise_std"]
    assert "content_dim" not in best  # it does not vary
    assert best.columns[best.columns.get_loc("epochs_run") + 1] == "best_disentanglement"


def test_best_trials_other_metrics_at_best_epoch():
    trials = trials_frame().assign(at_best_recon_error=[0.21, 0.31, 1.0, 0.26, 0.11])
    best = tables.best_trials(trials, "disentanglement", top=3)
    assert "at_best_recon_error" in best
    assert "best_recon_error" not in best
    assert best["at_best_recon_error"].tolist() == [0.26, 0.21, 0.31]
    assert "best_class_fidelity" in best  # no at_best_ column in this table


def test_best_trials_min_metric_sorts_ascending():
    best = tables.best_trials(trials_frame(), "recon_error", top=5)
    assert best["trial_id"].tolist() == ["e", "a", "d", "b", "c"]


def test_best_trials_missing_values_last():
    best = tables.best_trials(trials_frame(), "disentanglement", top=5)
    assert best["trial_id"].iloc[-1] == "e"


def test_searched_params_are_varied_fields():
    assert tables.searched_params(trials_frame()) == [
        "class_dim",
        "noise_std",
        "content_decay",
        "loss",
    ]


def test_param_scales_without_study():
    frame = trials_frame()
    scales = tables.param_scales(frame, ["class_dim", "noise_std", "content_decay", "loss"])
    assert scales == {
        "class_dim": "linear",  # 5 to 25: less than two decades
        "noise_std": "log",
        "content_decay": "linear",
        "loss": "linear",
    }


def test_param_scales_from_study_log_flags():
    def objective(trial):
        trial.suggest_float("noise_std", 1e-3, 10, log=True)
        trial.suggest_float("content_decay", 1e-3, 1, log=True)
        trial.suggest_int("class_dim", 2, 64)
        return 0.0

    scales = tables.param_scales(
        trials_frame(), ["noise_std", "content_decay", "class_dim"], make_study(objective, 2)
    )
    assert scales == {"noise_std": "log", "content_decay": "symlog", "class_dim": "linear"}


@pytest.mark.parametrize(
    ("text", "column", "op", "value"),
    [
        ("content_decay > 0", "content_decay", ">", 0.0),
        ("content_decay>0", "content_decay", ">", 0.0),
        ("noise_std <= 0.3", "noise_std", "<=", 0.3),
        ("loss = l1", "loss", "==", "l1"),
        ("loss != 'l2'", "loss", "!=", "l2"),
    ],
)
def test_parse_split(text, column, op, value):
    assert tables.parse_split(text) == tables.Split(column, op, value)


@pytest.mark.parametrize("text", ["content_decay", "> 0", "content_decay ~ 0", ""])
def test_parse_split_rejects(text):
    with pytest.raises(ValueError, match="invalid split"):
        tables.parse_split(text)


def test_split_labels():
    labels = tables.parse_split("content_decay > 0").labels(trials_frame())
    assert labels.tolist() == [
        "content_decay <= 0",
        "content_decay > 0",
        "content_decay <= 0",
        "content_decay > 0",
        "content_decay <= 0",
    ]


def test_split_unknown_column():
    with pytest.raises(ValueError, match="column 'lambda'"):
        tables.parse_split("lambda > 0").labels(trials_frame())


def test_variant_summary_by_split():
    summary = tables.variant_summary(
        trials_frame(), tables.parse_split("content_decay > 0"), "disentanglement"
    ).set_index("content_decay > 0")
    zero = summary.loc["content_decay <= 0"]
    positive = summary.loc["content_decay > 0"]
    assert zero["trials"] == 3
    assert zero["failed"] == 1
    assert zero["top_disentanglement"] == pytest.approx(0.4)  # diverged c and NaN e skipped
    assert positive["trials"] == 2
    assert positive["completed"] == 1
    assert positive["stopped"] == 1
    assert positive["median_disentanglement"] == pytest.approx(0.35)
    assert positive["median_content_leakage"] == pytest.approx(0.325)


def test_variant_summary_by_column():
    summary = tables.variant_summary(trials_frame(), "loss", "recon_error").set_index("loss")
    assert summary.loc["l2", "top_recon_error"] == pytest.approx(0.1)
    assert summary.loc["l1", "trials"] == 3


def test_default_split_needs_both_sides():
    assert tables.default_splits(trials_frame()) == [tables.Split("content_decay", ">", 0.0)]
    assert tables.default_splits(trials_frame().assign(content_decay=0.0)) == []


def test_ideal_neighbour_table_hits():
    nearest = {f"nearest_{d}": IDEAL_NEIGHBOURS[d][0] for d in range(10)}
    nearest["nearest_1"] = 9  # not an ideal neighbour of 1
    epochs = pd.DataFrame(
        [
            {"trial_id": "a", "epoch": 1, **{f"nearest_{d}": -1 for d in range(10)}},
            {"trial_id": "a", "epoch": 2, **nearest},
        ]
    )
    table = tables.ideal_neighbour_table(epochs, "a", epoch=2)
    assert table["hit"].sum() == 9
    assert table.loc[1, "nearest"] == 9
    assert not table.loc[1, "hit"]
    assert table.loc[0, "ideal"] == "3 8 9"
    assert tables.neighbour_history(epochs, "a").loc[1].tolist() == [-1] * 10


def test_ideal_neighbour_table_missing_epoch():
    epochs = pd.DataFrame(
        [{"trial_id": "a", "epoch": 1, **{f"nearest_{d}": 0 for d in range(10)}}]
    )
    with pytest.raises(ValueError, match="no epoch 7"):
        tables.ideal_neighbour_table(epochs, "a", epoch=7)


# --- probe images -----------------------------------------------------------------------------


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (84, 28), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_probe_pngs_closest_epoch(tmp_path):
    probes = tmp_path / "trial_x" / "probes"
    probes.mkdir(parents=True)
    for epoch in (5, 10, 15):
        (probes / f"thick_epoch_{epoch:04d}.png").write_bytes(png_bytes(epoch))
    (probes / "thin_epoch_0012.png").write_bytes(png_bytes(1))
    images = probe_images(tmp_path / "trial_x", epoch=12)
    assert [(image.name, image.epoch) for image in images] == [("thick", 10), ("thin", 12)]
    assert images[0].png == png_bytes(10)


def test_probe_tensorboard_images(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "trial_x"
    writer = SummaryWriter(str(folder / "tensorboard"))
    for step in (1, 3, 6):
        image = np.full((1, 28, 84), step / 10, dtype=np.float32)
        writer.add_image("probes/thick", image, step)
        writer.add_image("activations/thick", image, step)
    writer.close()
    images = probe_images(folder, epoch=4)
    assert [(image.name, image.epoch) for image in images] == [("probes/thick", 3)]
    decoded = Image.open(io.BytesIO(images[0].png))
    assert decoded.size == (84, 28)


def test_probe_images_none_recorded(tmp_path):
    (tmp_path / "trial_x" / "tensorboard").mkdir(parents=True)
    assert probe_images(tmp_path / "trial_x", epoch=3) == []
    assert probe_images(tmp_path / "missing", epoch=3) == []


def test_trial_folder_ignores_stale_absolute_path(tmp_path):
    (tmp_path / "trial_abc").mkdir()
    stored = "/old/place/experiment/trial_abc"
    assert trial_folder(tmp_path, "abc", stored) == tmp_path / "trial_abc"
    assert trial_folder(tmp_path, "abc", None) == tmp_path / "trial_abc"


# --- loading and the report on a synthetic experiment -----------------------------------------


@pytest.fixture(scope="module")
def synthetic_experiment(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("synthetic") / "exp", 24, 6, seed=1)


def test_load_moved_folder(synthetic_experiment, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(synthetic_experiment, moved)
    trials, epochs = analysis.load(moved)
    original = pd.read_parquet(synthetic_experiment / "trials.parquet")
    assert len(trials) == 24
    assert len(epochs) == 24 * 6
    assert (trials["experiment"] == "synthetic").all()
    pd.testing.assert_frame_equal(trials.drop(columns="experiment"), original)
    assert analysis.load_study(moved, "synthetic") is not None


def test_load_several_folders(synthetic_experiment, tmp_path):
    shutil.copytree(synthetic_experiment, tmp_path / "copy")
    trials, epochs = analysis.load([synthetic_experiment, tmp_path / "copy"])
    assert trials["experiment"].value_counts().to_dict() == {"synthetic": 24, "synthetic#2": 24}
    assert len(epochs) == 2 * 24 * 6


@pytest.mark.parametrize(
    ("remove", "message"),
    [("trials.parquet", "has no trials.parquet"), ("epochs.parquet", "has no epochs.parquet")],
)
def test_load_rejects_incomplete_folder(synthetic_experiment, tmp_path, remove, message):
    folder = tmp_path / "broken"
    shutil.copytree(synthetic_experiment, folder)
    (folder / remove).unlink()
    with pytest.raises(analysis.AnalysisError, match=message):
        analysis.load(folder)


def test_load_rejects_missing_folder(tmp_path):
    with pytest.raises(analysis.AnalysisError, match="experiment folder not found"):
        analysis.load(tmp_path / "nothing")


def test_load_rejects_unknown_metric(synthetic_experiment, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(synthetic_experiment, folder)
    info = json.loads((folder / "experiment.json").read_text())
    (folder / "experiment.json").write_text(json.dumps({**info, "metric": "accuracy"}))
    with pytest.raises(analysis.AnalysisError, match="unknown metric 'accuracy'"):
        analysis.load_experiment(folder)


def test_study_missing_gives_none(synthetic_experiment, tmp_path):
    folder = tmp_path / "nostudy"
    shutil.copytree(synthetic_experiment, folder)
    (folder / "optuna.db").unlink()
    assert analysis.load_experiment(folder).study() is None
    assert not (folder / "optuna.db").exists()  # reading must not create a database


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "lambda"], "invalid split 'lambda'"),
        (["--split", "lambda > 0"], "column 'lambda'"),
        (["--top", "0"], "invalid top=0"),
        (["--split", "class_dim > abc"], "class_dim contains numbers and 'abc' is not a number"),
        (["--split", "noise_std == 1e-9x"], "'1e-9x' is not a number"),
    ],
)
def test_analyze_cli_rejects(synthetic_experiment, tmp_path, capsys, args, message):
    code = main(["-q", "analyze", str(synthetic_experiment), "--out", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_analyze_rejects_folder_given_twice(synthetic_experiment, tmp_path, capsys):
    same = synthetic_experiment.parent / ".." / synthetic_experiment.parent.name
    folders = [str(synthetic_experiment), str(same / synthetic_experiment.name)]
    assert main(["-q", "analyze", *folders, "--out", str(tmp_path / "out")]) == 2
    assert f"{synthetic_experiment.resolve()} is given twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_analyze_replaces_earlier_report(synthetic_experiment, tmp_path):
    out = tmp_path / "report"
    analysis.analyze(synthetic_experiment, out, splits=["class_dim > 10"])
    split_files = {p.name for p in out.glob("variants_class_dim*")}
    assert split_files

    analysis.analyze(synthetic_experiment, out)  # the same report without the split

    assert not {p.name for p in out.glob("variants_class_dim*")}
    written = set((out / ".glo-search-report").read_text().split())
    assert written == {p.name for p in out.iterdir()} - {".glo-search-report"}


def test_analyze_cli_rejects_other_folder(synthetic_experiment, tmp_path, capsys):
    argv = ["-q", "analyze", str(synthetic_experiment), "--out", str(synthetic_experiment)]
    before = sorted(p.name for p in synthetic_experiment.iterdir())
    assert main(argv) == 2
    assert "contains files that no earlier report wrote" in capsys.readouterr().err
    assert sorted(p.name for p in synthetic_experiment.iterdir()) == before


def test_analyze_rejects_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not an experiment")
    assert main(["-q", "analyze", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"{path} is a file" in capsys.readouterr().err


def test_analyze_cli_writes_report_without_ray(synthetic_experiment, tmp_path):
    # A fresh interpreter shows that the command never imports Ray, let alone starts it.
    out = tmp_path / "report"
    script = (
        "import sys\n"
        "from glo_search.cli import main\n"
        f"code = main(['-q', 'analyze', {str(synthetic_experiment)!r}, '--out', {str(out)!r},"
        " '--top', '2'])\n"
        "print(code, 'ray' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert result.stdout.split()[-2:] == ["0", "False"]

    page = (out / "report.html").read_text()
    for key in (
        "best",
        "importance",
        "loss",
        "curves",
        "rungs",
        "params",
        "neighbours",
        "probes",
        "variants",
    ):
        assert f'<section id="{key}">' in page
    assert "no probe images recorded" in page
    assert "content_decay &gt; 0" in page  # the default split

    rungs = pd.read_csv(out / "rungs.csv")
    assert rungs["milestone"].tolist() == [1.0, 3.0, 6.0]  # grace 1, eta 3, max 6
    assert rungs["reached"].tolist() == [24, 24, 24]


def test_analyze_several_folders(synthetic_experiment, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_experiment, copy)
    out = tmp_path / "report"
    analysis.analyze([synthetic_experiment, copy], out, top=2)
    for name in ("importance_synthetic", "importance_synthetic_2", "rungs_synthetic_2"):
        assert (out / f"{name}.csv").is_file()
    variants = pd.read_csv(out / "variants_experiment.csv").set_index("experiment")
    assert variants["trials"].to_dict() == {"synthetic": 24, "synthetic#2": 24}
    best = pd.read_csv(out / "best_trials.csv")
    assert best.columns[0] == "experiment"


def test_analyze_notes_missing_epochs(synthetic_experiment, tmp_path):
    # A trial without epoch rows, as in a sweep that is still starting it.
    folder = tmp_path / "partial"
    shutil.copytree(synthetic_experiment, folder)
    trials = pd.read_parquet(folder / "trials.parquet")
    best_id = trials.sort_values("best_disentanglement").trial_id.iloc[-1]
    epochs = pd.read_parquet(folder / "epochs.parquet")
    epochs[epochs["trial_id"] != best_id].to_parquet(folder / "epochs.parquet")
    page = analysis.analyze(folder, tmp_path / "report", top=1).read_text()
    assert f"could not be built: trial &#x27;{best_id}&#x27; has no rows" in page
    assert '<section id="variants">' in page


def test_analyze_shows_probe_gallery(synthetic_experiment, tmp_path):
    folder = tmp_path / "with-probes"
    shutil.copytree(synthetic_experiment, folder)
    trials = pd.read_parquet(folder / "trials.parquet")
    best = trials.sort_values("best_disentanglement").iloc[-1]
    probes = folder / f"trial_{best.trial_id}" / "probes"
    probes.mkdir(parents=True)
    (probes / f"thick_epoch_{int(best.best_epoch):04d}.png").write_bytes(png_bytes(200))
    page = analysis.analyze(folder, tmp_path / "report", top=2).read_text()
    gallery = page[page.index('<section id="probes">') : page.index('<section id="variants">')]
    encoded = base64.b64encode(png_bytes(200)).decode("ascii")
    assert f"thick, epoch {int(best.best_epoch)}" in gallery
    assert encoded in gallery
    assert gallery.count("no probe images recorded") == 1  # the second trial has none


def test_study_with_best_values_scores_pruned_trials():
    import optuna

    from analysis.tables import study_with_best_values

    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.IntDistribution(1, 10)
    states = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    for number, state in enumerate(states):
        study.add_trial(
            optuna.trial.create_trial(
                params={"class_dim": number + 1},
                distributions={"class_dim": distribution},
                value=0.1 if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={1: 0.3},
                state=state,
                user_attrs={"tune_trial_id": f"t{number}"},
            )
        )
    trials = pd.DataFrame({"trial_id": ["t0", "t1"], "best_disentanglement": [0.5, 0.7]})
    scored = study_with_best_values(study, trials, "disentanglement")
    assert [t.value for t in scored.trials] == [0.5, 0.7]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in scored.trials)


def test_parse_split_rejects_doubled_operator():
    from analysis.tables import parse_split

    with pytest.raises(ValueError, match="is not a value"):
        parse_split("content_decay >> 0")


@pytest.mark.parametrize(
    ("values", "labels"),
    [
        ([2, 4, 9, 17, 64], {"2", "5", "10", "20", "50"}),  # a narrow log range
        ([1e-3, 1e-2, 1e-1, 1, 10], {"$\\mathdefault{10^{-2}}$", "$\\mathdefault{10^{0}}$"}),
    ],
)
def test_metrics_vs_params_log_axis_labels(values, labels):
    trials = trials_frame().assign(class_dim=values)
    figure = plots.plot_metrics_vs_params(trials, ["class_dim"], {"class_dim": "log"})
    axes = figure.axes[0]
    figure.canvas.draw()
    tick_labels = {label.get_text() for label in axes.get_xticklabels() if label.get_text()}
    assert labels <= tick_labels


def test_report_other_metric_best_epoch(synthetic_experiment, tmp_path):
    # The synthetic sweep ranked by disentanglement; this report ranks by content_leakage.
    analysis.analyze(synthetic_experiment, tmp_path / "out", metric="content_leakage")
    table = pd.read_csv(tmp_path / "out" / "best_trials.csv", dtype={"trial_id": str})
    _, epochs = analysis.load(synthetic_experiment)
    checked = 0
    for row in table.itertuples():
        rows = epochs[epochs["trial_id"] == row.trial_id].sort_values("epoch")
        if rows.empty:
            continue
        best = rows.loc[rows["content_leakage"].idxmin()]  # the first epoch at the minimum
        assert row.best_epoch == best["epoch"], row.trial_id
        assert row.at_best_disentanglement == pytest.approx(best["disentanglement"])
        checked += 1
    assert checked > 0
