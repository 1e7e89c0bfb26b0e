"""FINDINGS.md and study_report.html of a study run, with probe grids for each variant."""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from pathlib import Path

import pandas as pd

from glo_search import findings as f
from glo_search import probes
from glo_search.io import atomic_write_text
from glo_search.results import TRIALS_FILE
from glo_search.study import EXPERIMENTS, Plan

logger = logging.getLogger(__name__)

FINDINGS_FILE = "FINDINGS.md"
REPORT_FILE = "study_report.html"
# Claims whose verdict rests on what the outputs look like get probe grids per variant.
PICTURE_EXPERIMENTS = {2: "loss", 5: "noise_std"}


def _png_base64(image) -> str:
    from PIL import Image

    pixels = image[0].clamp(0, 1).mul(255).round().byte()  # (H, W)
    pixels = pixels.repeat_interleave(2, 0).repeat_interleave(2, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def variant_grids(folder: Path, key: str) -> list[tuple[str, str]]:
    """Probe grid of the lowest-seed trial of each variant, at its best checkpoint.

    Returns (caption, base64 PNG) pairs; all grids use the same probes.
    """
    trials = pd.read_parquet(folder / TRIALS_FILE)
    trials = trials[trials["checkpoint_path"].notna()].sort_values([key, "seed"])
    grids = []
    for value, group in trials.groupby(key, sort=True):
        trial = group.iloc[0]
        trainer = probes.load_for_probes(folder / trial["checkpoint_path"])
        dataset = trainer.dataset
        probe_set = probes.select_probes(dataset.images, dataset.labels, 0)
        grid = probes.probe_images(trainer, probe_set)["grid"]
        caption = f"{key} = {value} (seed {trial['seed']}, epoch {trial['best_epoch']})"
        grids.append((caption, _png_base64(grid)))
    return grids


def _table_html(table: pd.DataFrame) -> str:
    return table.to_html(index=False, float_format="{:.3f}".format, border=0, escape=True)


def report_html(
    findings: list[f.Finding], context: dict[str, str], folders: dict[str, Path]
) -> str:
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>glo-search study</title>",
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .6em;"
        "border-bottom:1px solid #ddd;text-align:right}figure{display:inline-block;"
        "margin:.5em}figcaption{font-size:.85em}</style></head><body>",
        "<h1>The hand-tuned study, re-run</h1><ul>",
        *[f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in context.items()],
        "</ul><h2>Verdicts</h2>",
        _table_html(f.verdict_table(findings)),
        "<p>The full analysis of every trial is in <a href=report/report.html>report/</a>.</p>",
    ]
    for finding in findings:
        parts.append(f"<h2>{finding.number}. {html.escape(finding.title)}</h2>")
        parts.append(f"<p>Claim: {html.escape(finding.claim)}</p>")
        parts.append(
            f"<p>Verdict: <b>{finding.verdict}</b>. Rule: {html.escape(finding.rule)}</p>"
        )
        if finding.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in finding.notes))
            parts.append("</ul>")
        for caption, table in finding.tables:
            parts.append(f"<p>{html.escape(caption)}</p>{_table_html(table)}")
        experiment = PICTURE_EXPERIMENTS.get(finding.number)
        if experiment in folders:
            parts.append(
                "<p>Probe grids: rows of [class image | content image | output] for "
                "reconstruction, thick, thin and slanted content, at each variant's best "
                "checkpoint.</p>"
            )
            for caption, encoded in variant_grids(folders[experiment], experiment):
                parts.append(
                    f'<figure><img alt="{html.escape(caption)}" '
                    f'src="data:image/png;base64,{encoded}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(
    folders: dict[str, Path], out: Path, plan: Plan, elapsed_s: float, command: str
) -> tuple[Path, Path]:
    """Evaluate the claims and write FINDINGS.md, study_report.html and report/."""
    from analysis import analyze

    findings = f.evaluate(folders, plan.long_epochs)
    context = {
        "command": command,
        "plan": f"{plan.name}: {plan.num_images} shipped MNIST test digits, seeds "
        f"{', '.join(map(str, plan.seeds))}, {plan.epochs} epochs "
        f"({plan.long_epochs} for content_decay), no early stopping",
        "reference setting": "class_dim 5, content_dim 25, noise_std 0.3, content_decay 0, "
        "loss l1+l2, generator glo; each experiment varies one of them",
        "experiments": ", ".join(f"{e.key} over {list(e.values)}" for e in EXPERIMENTS),
        "wall time": f"{elapsed_s / 60:.1f} minutes",
        "written": time.strftime("%Y-%m-%d %H:%M"),
    }
    findings_path = out / FINDINGS_FILE
    atomic_write_text(findings_path, f.findings_markdown(findings, context))
    analyze(list(folders.values()), out / "report")
    report_path = out / REPORT_FILE
    atomic_write_text(report_path, report_html(findings, context, folders))
    logger.info("study: wrote %s and %s", findings_path, report_path)
    return findings_path, report_path
