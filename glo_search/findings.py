"""Verdicts on the hand-tuned study's claims, from the folders that glo_search.study wrote.

Every comparison runs over seeds. A difference counts as clear when it exceeds twice its
standard error, which combines the per-seed spread of both sides. A smaller difference
in the claimed direction is ``unclear``. A clear difference against it means the claim
``does not hold``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from glo_search.results import EPOCHS_FILE, TRIALS_FILE
from glo_search.study import MEASURES_FILE, seed_summary

HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "unclear"


@dataclass
class Finding:
    """One claim of the hand study, the numbers measured for it and the verdict."""

    number: int
    title: str
    claim: str
    verdict: str
    rule: str
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class StudyData:
    """One experiment's trials joined with their values at the best and the last epoch."""

    key: str
    trials: pd.DataFrame  # one row per trial: config, at_best_*, final_*, measures
    epochs: pd.DataFrame


def load_experiment(folder: Path, key: str) -> StudyData:
    trials = pd.read_parquet(folder / TRIALS_FILE)
    epochs = pd.read_parquet(folder / EPOCHS_FILE)
    trials = trials[trials["status"].isin(["completed", "stopped"])].copy()
    metric_names = [c for c in epochs.columns if c.startswith(_METRIC_PREFIXES)]
    at_best = []
    final = []
    for _, trial in trials.iterrows():
        rows = epochs[epochs["trial_id"] == trial["trial_id"]].sort_values("epoch")
        best = rows[rows["epoch"] == trial["best_epoch"]].iloc[0]
        at_best.append({f"at_best_{n}": best[n] for n in metric_names})
        final.append({f"final_{n}": rows.iloc[-1][n] for n in metric_names})
    # trials.parquet may carry at_best_* columns already; the ones computed here win.
    trials = trials.drop(columns=[c for c in trials if c.startswith(("at_best_", "final_"))])
    trials = pd.concat(
        [trials.reset_index(drop=True), pd.DataFrame(at_best), pd.DataFrame(final)], axis=1
    )
    measures_path = folder / MEASURES_FILE
    if measures_path.is_file():
        trials = trials.merge(pd.read_parquet(measures_path), on="trial_id", how="left")
    return StudyData(key, trials, epochs)


_METRIC_PREFIXES = (
    "recon_error",
    "ideal_neighbour_accuracy",
    "class_fidelity",
    "style_transfer",
    "disentanglement",
    "content_leakage",
)


def compare(a: pd.Series, b: pd.Series) -> str:
    """Return HOLDS when a is clearly greater than b, FAILS when clearly smaller, else UNCLEAR."""
    mean_a, sd_a, n_a = seed_summary(a)
    mean_b, sd_b, n_b = seed_summary(b)
    if n_a == 0 or n_b == 0:
        return UNCLEAR
    error = math.sqrt(sd_a**2 / n_a + sd_b**2 / n_b)
    difference = mean_a - mean_b
    if difference > 2 * error and difference > 0:
        return HOLDS
    if difference < -2 * error and difference < 0:
        return FAILS
    return UNCLEAR


def combine(verdicts: Iterable[str]) -> str:
    """Combine parts: holds when all hold, does not hold when any fails, else unclear."""
    verdicts = list(verdicts)
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == FAILS for v in verdicts):
        return FAILS
    return UNCLEAR


def _threshold(holds: bool, fails: bool) -> str:
    if holds:
        return HOLDS
    if fails:
        return FAILS
    return UNCLEAR


def _values(data: StudyData, value, column: str) -> pd.Series:
    """Per-seed values of column for the trials whose varied key equals value."""
    if isinstance(value, str):
        rows = data.trials[data.trials[data.key] == value]
    else:
        rows = data.trials[np.isclose(data.trials[data.key].astype(float), value)]
    return rows[column]


def variant_table(data: StudyData, columns: list[str]) -> pd.DataFrame:
    """Mean ± sd over seeds of each column, one row per value of the varied key."""
    rows = []
    for value, group in data.trials.groupby(data.key, sort=True):
        shown = f"{value:g}" if isinstance(value, float) else value  # 0.0001, not 0.000
        row = {data.key: shown, "seeds": len(group)}
        for column in columns:
            mean, sd, _ = seed_summary(group[column])
            row[column] = f"{mean:.3f} ± {sd:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def best_variant(data: StudyData, column: str, claimed, higher: bool = True) -> str:
    """Verdict on "claimed is the best value": compared with the strongest other value."""
    means = data.trials.groupby(data.key)[column].mean()
    others = means.drop(index=claimed)
    rival = others.idxmax() if higher else others.idxmin()
    claimed_values = _values(data, claimed, column)
    rival_values = _values(data, rival, column)
    if not higher:
        claimed_values, rival_values = -claimed_values, -rival_values
    verdict = compare(claimed_values, rival_values)
    if verdict == UNCLEAR and means[claimed] == (means.max() if higher else means.min()):
        return UNCLEAR  # best on average but within noise of the runner-up
    return verdict


def claim_pixel_loss(experiments: dict[str, StudyData]) -> Finding:
    """Claim 1: a low pixel loss does not tell good runs from bad ones."""
    rows = []
    for data in experiments.values():
        seeds = data.trials.set_index("trial_id")["seed"]
        pooled = data.epochs[data.epochs["trial_id"].isin(seeds.index)].copy()
        pooled["seed"] = pooled["trial_id"].map(seeds)
        rows.append(pooled)
    epochs = pd.concat(rows, ignore_index=True)
    epochs = epochs[epochs["diverged"] == 0]
    table = []
    for seed, group in epochs.groupby("seed"):
        low = group[group["recon_error"] <= group["recon_error"].quantile(0.25)]
        high = group[group["recon_error"] >= group["recon_error"].quantile(0.9)]
        table.append(
            {
                "seed": seed,
                "trial-epochs": len(group),
                "rho overall": spearmanr(group["recon_error"], group["disentanglement"])[0],
                "rho lowest-loss quartile": spearmanr(low["recon_error"], low["disentanglement"])[
                    0
                ],
                "max disentanglement, top-decile loss": high["disentanglement"].max(),
                "max disentanglement, all": group["disentanglement"].max(),
            }
        )
    table = pd.DataFrame(table)
    low_rho = table["rho lowest-loss quartile"]
    high_share = table["max disentanglement, top-decile loss"] / table["max disentanglement, all"]
    near_zero = _threshold(low_rho.abs().max() < 0.3, low_rho.abs().mean() >= 0.5)
    high_poor = _threshold(high_share.max() <= 0.25, high_share.max() > 0.5)
    return Finding(
        1,
        "Pixel loss misleads at low values",
        "Among runs with the lowest recon_error, recon_error and disentanglement are "
        "barely correlated, while a very high loss always means poor results.",
        combine([near_zero, high_poor]),
        "holds when |Spearman rho| in the lowest-loss quartile stays below 0.3 for every "
        "seed and the best disentanglement among the 10% highest-loss trial-epochs is at "
        "most a quarter of the overall best; does not hold when the mean |rho| is 0.5 or "
        "more or that share exceeds one half.",
        [
            (
                "Spearman correlation of recon_error with disentanglement, all trial-epochs of "
                "the study",
                table,
            )
        ],
        [f"lowest-quartile rho: {near_zero}; high loss means poor results: {high_poor}"],
    )


def claim_losses(data: StudyData) -> Finding:
    columns = [
        "at_best_disentanglement",
        "at_best_class_fidelity",
        "at_best_style_transfer",
        "final_recon_error",
        "sharpness",
        "coarse_error",
    ]
    column_present = [c for c in columns if c in data.trials]
    global_structure = compare(
        -_values(data, "l2", "coarse_error"), -_values(data, "l1", "coarse_error")
    )
    sharper = compare(_values(data, "l1", "sharpness"), _values(data, "l2", "sharpness"))
    combined_best = combine(
        [
            compare(
                _values(data, "l1+l2", "at_best_disentanglement"),
                _values(data, other, "at_best_disentanglement"),
            )
            for other in ("l1", "l2")
        ]
    )
    return Finding(
        2,
        "L1 and L2 differ; L1+L2 is better than either",
        "L2 keeps global structure and L1 sharper local edges; L1+L2 is better than either.",
        combine([global_structure, sharper, combined_best]),
        "global structure: lower coarse_error (squared error of 4x4 block means of the "
        "reconstructions) for l2 than l1; sharp edges: higher sharpness (mean gradient of "
        "the reconstructions over the targets') for l1 than l2; better: higher "
        "disentanglement for l1+l2 than for each of l1 and l2, each comparison clear over "
        "seeds.",
        [("per loss, mean ± sd over seeds", variant_table(data, column_present))],
        [
            f"l2 keeps global structure better: {global_structure}",
            f"l1 gives sharper edges: {sharper}",
            f"l1+l2 disentangles better than l1 and l2: {combined_best}",
        ],
    )


def claim_class_dim(data: StudyData) -> Finding:
    verdict = best_variant(data, "at_best_disentanglement", 5)
    columns = [
        "at_best_disentanglement",
        "at_best_class_fidelity",
        "at_best_style_transfer",
        "at_best_ideal_neighbour_accuracy",
    ]
    return Finding(
        3,
        "Class-code size 5 is best",
        "Among class_dim 5, 10, 15, 25 and 50, 5 gave the most natural results.",
        verdict,
        "holds when class_dim 5 has clearly the highest disentanglement at its best epoch; "
        "does not hold when another size is clearly higher.",
        [("per class_dim, mean ± sd over seeds", variant_table(data, columns))],
    )


def claim_content_dim(data: StudyData) -> Finding:
    chosen = best_variant(data, "at_best_disentanglement", 25)
    reconstructs = compare(
        -_values(data, 100, "final_recon_error"), -_values(data, 25, "final_recon_error")
    )
    loses_thickness = compare(
        _values(data, 25, "transfer_thickness"), _values(data, 100, "transfer_thickness")
    )
    columns = [
        "at_best_disentanglement",
        "final_recon_error",
        "transfer_thickness",
        "at_best_content_leakage",
    ]
    return Finding(
        4,
        "Content-code size 25; 100 reconstructs well but loses thickness",
        "Among content_dim 10, 25, 50, 75 and 100, 25 was chosen; 100 reconstructs well "
        "but loses thickness transfer.",
        combine([chosen, reconstructs, loses_thickness]),
        "25 chosen: content_dim 25 has clearly the highest disentanglement; 100 "
        "reconstructs well: clearly lower final recon_error than 25; loses thickness: "
        "clearly lower thickness transfer (correlation of source and output stroke "
        "thickness) than 25.",
        [
            (
                "per content_dim, mean ± sd over seeds",
                variant_table(data, [c for c in columns if c in data.trials]),
            )
        ],
        [
            f"25 is the best size: {chosen}",
            f"100 reconstructs better than 25: {reconstructs}",
            f"100 transfers thickness worse than 25: {loses_thickness}",
        ],
    )


def claim_noise(data: StudyData) -> Finding:
    large = [v for v in (5.0, 10.0, 100.0) if (np.isclose(data.trials[data.key], v)).any()]
    parts = []
    for value in large:
        distinct = _values(data, value, "distinct_outputs").mean()
        transfer = _values(data, value, "at_best_style_transfer").mean()
        parts.append(
            _threshold(distinct <= 30 and transfer <= 0.1, distinct > 100 and transfer > 0.2)
        )
    ignores = combine(parts)
    unrecognizable = _values(data, 100.0, "at_best_class_fidelity").mean()
    garbage = _threshold(unrecognizable < 0.5, unrecognizable > 0.8)
    leaks = combine(
        [
            compare(
                _values(data, 0.0001, "at_best_content_leakage"),
                _values(data, 0.3, "at_best_content_leakage"),
            ),
            compare(
                _values(data, 0.0001, "source_digit_rate"), _values(data, 0.3, "source_digit_rate")
            ),
        ]
    )
    columns = [
        "distinct_outputs",
        "at_best_style_transfer",
        "at_best_class_fidelity",
        "at_best_content_leakage",
        "source_digit_rate",
        "at_best_disentanglement",
    ]
    return Finding(
        5,
        "High noise ignores content; tiny noise lets content carry the class",
        "At noise_std 5 and above the output ignores the content (about 10 distinct "
        "outputs); at 100 the outputs are unrecognizable; at 0.0001 content codes carry "
        "the class.",
        combine([ignores, garbage, leaks]),
        "ignores content: for every noise_std >= 5, at most 30 distinct outputs among 500 "
        "cross-class swaps (mean absolute pixel difference under 0.02 counts as the same "
        "output) and style transfer at most 0.1; unrecognizable: class fidelity under 0.5 "
        "at 100; class in content: content_leakage and the share of swaps that the "
        "classifier labels as the content's own digit both clearly higher at 0.0001 than "
        "at 0.3.",
        [
            (
                "per noise_std, mean ± sd over seeds",
                variant_table(data, [c for c in columns if c in data.trials]),
            )
        ],
        [
            f"noise_std >= 5 ignores content: {ignores}",
            f"noise_std 100 is unrecognizable: {garbage}",
            f"noise_std 0.0001 lets content carry the class: {leaks}",
        ],
    )


def claim_decay(data: StudyData) -> Finding:
    positive = data.trials[data.trials[data.key] > 0]
    best_positive = best_variant(
        StudyData(data.key, positive, data.epochs), "at_best_disentanglement", 0.1
    )
    early = combine(
        [
            compare(
                _values(data, 0.1, "at_best_disentanglement"),
                _values(data, 0.1, "final_disentanglement"),
            ),
            compare(
                _values(data, 0.1, "at_best_style_transfer"),
                _values(data, 0.1, "final_style_transfer"),
            ),
        ]
    )
    zero_drop = (
        _values(data, 0.0, "at_best_disentanglement").values
        - _values(data, 0.0, "final_disentanglement").values
    )
    tenth_drop = (
        _values(data, 0.1, "at_best_disentanglement").values
        - _values(data, 0.1, "final_disentanglement").values
    )
    easier = combine(
        [
            compare(pd.Series(tenth_drop), pd.Series(zero_drop)),
            compare(
                _values(data, 0.0, "final_disentanglement"),
                _values(data, 0.1, "final_disentanglement"),
            ),
        ]
    )
    transfers = combine(
        [
            compare(_values(data, 0.0, f"transfer_{name}"), _values(data, 0.1, f"transfer_{name}"))
            for name in ("thickness", "slant")
        ]
    )
    columns = [
        "at_best_disentanglement",
        "final_disentanglement",
        "best_epoch",
        "at_best_style_transfer",
        "final_style_transfer",
        "transfer_thickness",
        "transfer_slant",
    ]
    return Finding(
        6,
        "Content penalty 0.1 is best but only when stopped early; 0 is easier",
        "lambda = 0.1 gave the best results among 0.1, 0.5 and 1, but only when stopped "
        "early; trained to convergence it ignores content. lambda = 0 was easier to train "
        "and transferred thickness and rotation better.",
        combine([best_positive, early, easier, transfers]),
        "0.1 best: clearly the highest best-epoch disentanglement among 0.1, 0.5, 1; only "
        "early: best-epoch disentanglement and style transfer clearly above the last "
        "epoch's for 0.1; easier: the drop from best to last epoch clearly smaller and the "
        "last-epoch disentanglement clearly higher for 0 than for 0.1; transfers better: "
        "thickness and slant transfer at the best checkpoint clearly higher for 0.",
        [
            (
                "per content_decay, mean ± sd over seeds",
                variant_table(data, [c for c in columns if c in data.trials]),
            )
        ],
        [
            f"0.1 is the best positive penalty: {best_positive}",
            f"0.1 is good only when stopped early: {early}",
            f"0 is easier to train: {easier}",
            f"0 transfers thickness and slant better: {transfers}",
        ],
    )


def claim_neighbours(data: StudyData, epochs_trained: int) -> Finding:
    zero = _values(data, 0.0, "final_ideal_neighbour_accuracy")
    tenth = _values(data, 0.1, "final_ideal_neighbour_accuracy")
    checks = []
    for values, claimed in ((zero, 0.5), (tenth, 0.6)):
        mean, _, _ = seed_summary(values)
        gap = abs(mean - claimed)
        checks.append(_threshold(gap <= 0.1, gap > 0.2))
    table = pd.DataFrame(
        [
            {
                "content_decay": 0.0,
                "claimed": 0.5,
                "measured (mean ± sd)": "{:.3f} ± {:.3f}".format(*seed_summary(zero)[:2]),
                "seeds": len(zero),
            },
            {
                "content_decay": 0.1,
                "claimed": 0.6,
                "measured (mean ± sd)": "{:.3f} ± {:.3f}".format(*seed_summary(tenth)[:2]),
                "seeds": len(tenth),
            },
        ]
    )
    return Finding(
        7,
        "Ideal-neighbour accuracy 50% (lambda 0) and 60% (lambda 0.1)",
        "After about 100 epochs the study measured 50% with lambda = 0 and 60% with lambda = 0.1.",
        combine(checks),
        f"holds when both measured values at the last epoch ({epochs_trained}) are within "
        "0.1 of the claimed ones; does not hold when either is more than 0.2 away.",
        [("ideal_neighbour_accuracy at the last epoch", table)],
    )


def evaluate(folders: dict[str, Path], long_epochs: int) -> list[Finding]:
    """Evaluate each claim whose experiments are among the study's folders."""
    data = {name: load_experiment(folder, name) for name, folder in folders.items()}
    claims = [
        (claim_losses, "loss"),
        (claim_class_dim, "class_dim"),
        (claim_content_dim, "content_dim"),
        (claim_noise, "noise_std"),
        (claim_decay, "content_decay"),
    ]
    findings = [claim_pixel_loss(data)] if data else []
    findings += [claim(data[name]) for claim, name in claims if name in data]
    if "content_decay" in data:
        findings.append(claim_neighbours(data["content_decay"], long_epochs))
    return findings


def markdown_table(table: pd.DataFrame) -> str:
    """Render a DataFrame as a GitHub Markdown table (floats to 3 decimals)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def verdict_table(findings: list[Finding]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"claim": f"{f.number}. {f.title}", "verdict": f.verdict} for f in findings]
    )


def findings_markdown(findings: list[Finding], context: dict[str, str]) -> str:
    """Write FINDINGS.md's text: the verdict table, then each claim with its numbers."""
    lines = [
        "# Findings: the hand-tuned study, re-run",
        "",
        "Each claim of the hand-tuned study of this GLO model, tested with glo-search's "
        "own sweeps, with the numbers and a verdict.",
        "",
        *[f"- {key}: {value}" for key, value in context.items()],
        "",
        "A difference counts as clear when it exceeds twice its standard error over "
        "seeds; a smaller one in the claimed direction is unclear.",
        "",
        "## Verdicts",
        "",
        markdown_table(verdict_table(findings)),
    ]
    for finding in findings:
        lines += [
            "",
            f"## {finding.number}. {finding.title}",
            "",
            f"Claim: {finding.claim}",
            "",
            f"Verdict: **{finding.verdict}**. Rule: {finding.rule}",
        ]
        for note in finding.notes:
            lines.append(f"- {note}")
        for caption, table in finding.tables:
            lines += ["", f"{caption}:", "", markdown_table(table)]
    return "\n".join(lines) + "\n"
