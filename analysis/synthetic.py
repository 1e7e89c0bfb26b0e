"""Write a synthetic experiment folder with the files and columns of a real sweep.

For benchmarks and tests of the analysis at sizes a real sweep cannot reach quickly. The
values are made up: curves with noise whose shape depends on the hyperparameters, drawn
from the ``default`` search space's ranges. Trial folders are not created, so the report
finds no probe images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from glo_search.config import TrainConfig
from glo_search.metrics import IDEAL_NEIGHBOURS, METRICS
from glo_search.results import EPOCHS_FILE, TRIALS_FILE, summarize

NAME = "synthetic"


def _params(rng: np.random.Generator) -> dict:
    decay_on = bool(rng.random() < 0.5)
    return {
        "class_dim": int(round(np.exp(rng.uniform(np.log(2), np.log(64))))),
        "content_dim": int(round(np.exp(rng.uniform(np.log(4), np.log(128))))),
        "noise_std": float(np.exp(rng.uniform(np.log(1e-3), np.log(10.0)))),
        "_content_decay_on": decay_on,
        "content_decay": float(np.exp(rng.uniform(np.log(1e-3), 0.0))) if decay_on else 0.0,
    }


def _curves(params: dict, epochs: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(1, epochs + 1)
    recon = 0.1 + 0.25 * np.exp(-t / 10) + 0.02 / np.sqrt(params["content_dim"])
    recon = recon + rng.normal(0, 0.005, epochs)
    # Disentanglement peaks for moderate noise (sigma near 0.3), as the hand study found.
    peak = np.exp(-((np.log10(params["noise_std"]) + 0.5) ** 2))
    fidelity = np.clip(0.1 + 0.8 * peak * (1 - np.exp(-t / 8)) + rng.normal(0, 0.02, epochs), 0, 1)
    style = np.clip(0.2 + 0.5 * peak + rng.normal(0, 0.03, epochs), 0, 1)
    return {
        "recon_error": recon,
        "ideal_neighbour_accuracy": np.clip(0.3 + 0.4 * peak + rng.normal(0, 0.1, epochs), 0, 1),
        "class_fidelity": fidelity,
        "style_transfer": style,
        "disentanglement": fidelity * style,
        "content_leakage": np.clip(0.1 + 0.5 * (1 - peak) + rng.normal(0, 0.02, epochs), 0, 1),
    }


def _nearest(rng: np.random.Generator, hit_rate: float) -> list[int]:
    nearest = []
    for digit in range(10):
        if rng.random() < hit_rate:
            nearest.append(int(rng.choice(IDEAL_NEIGHBOURS[digit])))
        else:
            nearest.append(int(rng.choice([d for d in range(10) if d != digit])))
    return nearest


def _epoch_rows(trial_id: str, curves: dict, rng: np.random.Generator) -> list[dict]:
    rows = []
    for k in range(len(curves["recon_error"])):
        row = {
            "trial_id": trial_id,
            "epoch": k + 1,
            "train_loss": float(curves["recon_error"][k] * 0.9),
            "diverged": 0,
            "time_total_s": 2.0 * (k + 1),
        }
        row.update({name: float(curves[name][k]) for name in METRICS})
        nearest = _nearest(rng, row["ideal_neighbour_accuracy"])
        row.update({f"nearest_{d}": nearest[d] for d in range(10)})
        rows.append(row)
    return rows


def write_experiment(
    folder: str | Path, num_trials: int = 1000, num_epochs: int = 100, seed: int = 0
) -> Path:
    """Write trials.parquet, epochs.parquet, experiment.json and optuna.db into ``folder``.

    Every trial runs ``num_epochs`` epochs and is ``completed``; the sweep's metric is
    disentanglement. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = TrainConfig(epochs=num_epochs).to_dict()
    trials, epochs, study_trials = [], [], []
    for number in range(num_trials):
        trial_id = f"{number:05d}syn"
        params = _params(rng)
        rows = _epoch_rows(trial_id, _curves(params, num_epochs, rng), rng)
        config = {**base, **{k: v for k, v in params.items() if not k.startswith("_")}}
        trial = {"trial_id": trial_id, "status": "completed", **config}
        trial.update(
            {
                "trial_dir": f"trial_{trial_id}",
                "epochs_run": num_epochs,
                "wall_time_s": rows[-1]["time_total_s"],
                "checkpoint_path": None,
                **summarize(rows, "disentanglement", "max"),
            }
        )
        trials.append(trial)
        epochs.extend(rows)
        study_trials.append((params, rows[-1]["disentanglement"]))
    pd.DataFrame(trials).to_parquet(folder / TRIALS_FILE, index=False)
    pd.DataFrame(epochs).to_parquet(folder / EPOCHS_FILE, index=False)
    _write_study(folder, study_trials)
    _write_info(folder, num_epochs, num_trials, base)
    return folder


def _write_info(folder: Path, num_epochs: int, num_trials: int, base: dict) -> None:
    info = {
        "name": NAME,
        "metric": "disentanglement",
        "mode": "max",
        "space": "default",
        "num_samples": num_trials,
        "max_epochs": num_epochs,
        "scheduler": "AsyncHyperBandScheduler",
        "base_config": base,
        "grace_period": 1,
        "reduction_factor": 3,
    }
    (folder / "experiment.json").write_text(json.dumps(info, indent=2) + "\n")


def _write_study(folder: Path, study_trials: list[tuple[dict, float]]) -> None:
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    distributions = {
        "class_dim": IntDistribution(2, 64, log=True),
        "content_dim": IntDistribution(4, 128, log=True),
        "noise_std": FloatDistribution(1e-3, 10.0, log=True),
        "_content_decay_on": CategoricalDistribution([False, True]),
        "content_decay": FloatDistribution(1e-3, 1.0, log=True),
    }
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name=NAME, direction="maximize")
    frozen = []
    for params, value in study_trials:
        used = {
            k: v for k, v in params.items() if k != "content_decay" or params["_content_decay_on"]
        }
        frozen.append(
            optuna.trial.create_trial(
                params=used,
                distributions={k: distributions[k] for k in used},
                value=value,
            )
        )
    study.add_trials(frozen)
