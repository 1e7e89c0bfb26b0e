"""Write report.html with its PNG plots and CSV tables for one or several experiments.

The HTML file embeds every image as a base64 data URI and loads nothing from the network,
so it opens offline and can be mailed as one file. The PNG and CSV files beside it are the
same figures and tables, for papers and scripts.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import plots, tables
from analysis.experiment import Experiment, combine, load_experiments
from analysis.probes import probe_images, trial_folder
from glo_search.io import atomic_write_text
from glo_search.metrics import METRICS

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
# The names of the files a report wrote, one per line, so that the next report into the
# same folder can remove those it does not write again.
MANIFEST_FILE = ".glo-search-report"
LOSS_METRICS = ("disentanglement", "ideal_neighbour_accuracy")


@dataclass
class Section:
    """One part of the report: a heading, a lead paragraph and HTML blocks."""

    key: str
    title: str
    lead: str
    blocks: list[str] = field(default_factory=list)


class ReportFiles:
    """Save figures and tables into the output folder and return their HTML."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: list[Path] = []

    def figure(self, name: str, figure: Figure, caption: str = "") -> str:
        path = self.out / f"{name}.png"
        data = plots.save_png(figure, path)
        self.files.append(path)
        return _image_html(data, name, caption)

    def table(self, name: str, table: pd.DataFrame, caption: str = "") -> str:
        path = self.out / f"{name}.csv"
        table.to_csv(path, index=False)
        self.files.append(path)
        return _table_html(table, caption)


def _image_html(data: bytes, alt: str, caption: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'
        f"{caption_html}</figure>"
    )


def _format_cell(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def _table_html(table: pd.DataFrame, caption: str = "") -> str:
    if table.empty:
        return f"<p class=note>{html.escape(caption + ': ' if caption else '')}no rows</p>"
    formatted = table.map(_format_cell)
    body = formatted.to_html(index=False, escape=True, border=0)
    caption_html = f"<p class=caption>{html.escape(caption)}</p>" if caption else ""
    return f"{caption_html}<div class=scroll>{body}</div>"


_OPERATOR_WORDS = {">=": "ge", "<=": "le", "!=": "ne", "==": "eq", ">": "gt", "<": "lt"}


def _slug(text: str) -> str:
    """Turn a label such as ``content_decay > 0`` into a file name part: content_decay_gt_0."""
    for op, word in _OPERATOR_WORDS.items():
        text = text.replace(op, f" {word} ")
    return "_".join("".join(c if c.isalnum() or c in "-." else " " for c in text).split())


def _note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


@dataclass
class Context:
    """Inputs of every section: the experiments, their combined tables and the options."""

    experiments: list[Experiment]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    metric: str
    top: int
    splits: list[tables.Split]
    params: list[str]
    files: ReportFiles

    @property
    def study(self):
        for experiment in self.experiments:
            if experiment.study() is not None:
                return experiment.study()
        return None


def _top_rows(context: Context, count: int) -> pd.DataFrame:
    """Return the full trials rows of the ``count`` best trials by the report's metric."""
    ordered = context.trials.sort_values(
        tables.best_column(context.metric),
        ascending=METRICS[context.metric].mode == "min",
        na_position="last",
        kind="stable",
    )
    return ordered.head(count)


def _epochs_of(context: Context, row: pd.Series) -> pd.DataFrame:
    epochs = context.epochs[context.epochs["trial_id"] == row["trial_id"]]
    if "experiment" in row and "experiment" in epochs:
        epochs = epochs[epochs["experiment"] == row["experiment"]]
    return epochs


def _trial_label(context: Context, row: pd.Series) -> str:
    if len(context.experiments) > 1:
        return f"{row['experiment']}/{row['trial_id']}"
    return str(row["trial_id"])


def best_section(context: Context) -> Section:
    section = Section(
        "best",
        "Best trials",
        f"The {min(context.top * 2, len(context.trials))} best trials by their best "
        f"{context.metric}, with the searched "
        "hyperparameters, the epoch of that best value, the epochs run, the status and "
        "every other metric at that epoch (at_best_ columns), as the sweep's summary "
        "shows them.",
    )
    best = tables.best_trials(context.trials, context.metric, context.top * 2, context.params)
    section.blocks.append(context.files.table("best_trials", best))
    return section


def importance_section(context: Context) -> Section:
    section = Section(
        "importance",
        "Parameter importance",
        "Optuna's importance evaluators on each experiment's study, with each trial's "
        "best value of the metric over the epochs it ran (from trials.parquet), so that "
        "trials ASHA stopped early count too. PED-ANOVA also scores conditional "
        "parameters; fANOVA scores only those every trial has. A parameter whose "
        "name starts with an underscore is a branch switch of the search space.",
    )
    for experiment in context.experiments:
        study = experiment.study()
        suffix = f"_{_slug(experiment.name)}" if len(context.experiments) > 1 else ""
        if study is None:
            section.blocks.append(
                _note(
                    f"{experiment.name}: no Optuna study ({experiment.folder}"
                    "/optuna.db is missing or holds another study)"
                )
            )
            continue
        trials = context.trials[context.trials["experiment"] == experiment.name]
        scored = tables.study_with_best_values(study, trials, context.metric)
        if len(scored.trials) < 2:
            scored = study  # a study without tune_trial_id, written before glo-search kept it
        gap = tables.importance_gap(scored, context.metric)
        if gap is not None:
            section.blocks.append(_note(f"{experiment.name}: no parameter importances, {gap}"))
            continue
        importances = tables.param_importances(scored)
        scored_count = int(importances["scored_trials"].max()) if len(importances) else 0
        caption = f"{experiment.name}: {scored_count} trials scored"
        section.blocks.append(context.files.table(f"importance{suffix}", importances, caption))
        figure = plots.plot_importances(importances, experiment.metric)
        section.blocks.append(context.files.figure(f"importance{suffix}", figure))
    return section


def loss_section(context: Context) -> Section:
    section = Section(
        "loss",
        "Metric against loss",
        "Every trial-epoch that did not diverge, recon_error against disentanglement and "
        "against ideal_neighbour_accuracy, with Spearman's rank correlation over all "
        "trial-epochs and over those in the lowest-loss quartile. If a low pixel loss "
        "picked good runs, the correlation would be clearly negative in both rows; a "
        "correlation near 0 in the lowest quartile means the loss cannot tell good runs "
        "from bad among those that reconstruct well.",
    )
    correlations = tables.loss_correlations(context.epochs, LOSS_METRICS)
    section.blocks.append(context.files.table("loss_correlation", correlations))
    figure = plots.plot_metric_vs_loss(context.epochs, correlations, LOSS_METRICS)
    section.blocks.append(context.files.figure("metric_vs_loss", figure))
    return section


def curves_section(context: Context) -> Section:
    section = Section(
        "curves",
        "Learning curves",
        f"Every metric over the epochs for the {context.top} best trials by {context.metric}.",
    )
    best = _top_rows(context, context.top)
    curves = {_trial_label(context, row): _epochs_of(context, row) for _, row in best.iterrows()}
    figure = plots.plot_learning_curves(curves)
    section.blocks.append(context.files.figure("learning_curves", figure))
    return section


def rungs_section(context: Context) -> Section:
    section = Section(
        "rungs",
        "ASHA rungs",
        "How many trials reached each rung of the ASHA scheduler (epochs at which a trial "
        "is compared with the others and the weaker ones stop), and how many ran all "
        "max_epochs.",
    )
    for experiment in context.experiments:
        suffix = f"_{_slug(experiment.name)}" if len(context.experiments) > 1 else ""
        rungs = tables.asha_rungs(experiment.info, experiment.trials)
        survival = tables.rung_survival(
            experiment.trials, rungs, experiment.info.get("max_epochs")
        )
        scheduler = experiment.info.get("scheduler", "unknown")
        caption = f"{experiment.name}: scheduler {scheduler}, {len(experiment.trials)} trials"
        section.blocks.append(context.files.table(f"rungs{suffix}", survival, caption))
        section.blocks.append(
            context.files.figure(f"rungs{suffix}", plots.plot_rung_survival(survival))
        )
    return section


def params_section(context: Context) -> Section:
    section = Section(
        "params",
        "Metrics against hyperparameters",
        "Each trial's best value of each metric against each searched hyperparameter, "
        "coloured by status; axes are logarithmic where the search space is (symmetric "
        "log where the value 0 is its own branch).",
    )
    study = context.study
    scales = tables.param_scales(context.trials, context.params, study)
    figure = plots.plot_metrics_vs_params(context.trials, context.params, scales)
    section.blocks.append(context.files.figure("metrics_vs_params", figure))
    return section


def neighbours_section(context: Context) -> Section:
    best = tables.best_trial(context.trials, context.metric)
    experiment = best.get("experiment")
    epoch = int(best["best_epoch"]) if pd.notna(best["best_epoch"]) else None
    section = Section(
        "neighbours",
        "Class-code neighbours",
        f"The best trial ({best['trial_id']}) by {context.metric}: each digit's nearest "
        "class code over the epochs (green where it is one of the digit's ideal "
        f"neighbours), and the ideal-neighbour table at its best epoch ({epoch}).",
    )
    history = tables.neighbour_history(context.epochs, best["trial_id"], experiment)
    section.blocks.append(context.files.figure("neighbours", plots.plot_neighbours(history)))
    table = tables.ideal_neighbour_table(context.epochs, best["trial_id"], epoch, experiment)
    caption = f"{int(table['hit'].sum())} of 10 digits hit at epoch {epoch}"
    section.blocks.append(context.files.table("ideal_neighbours", table, caption))
    return section


def probes_section(context: Context) -> Section:
    section = Section(
        "probes",
        "Probe galleries",
        "The probe grids ([class | content | output] rows) of the best trials at the "
        "epoch closest to their best, from PNG files under the trial folder's probes/ or "
        "from its TensorBoard image summaries.",
    )
    folders = {e.name: e.folder for e in context.experiments}
    for _, row in _top_rows(context, context.top).iterrows():
        folder = trial_folder(folders[row["experiment"]], row["trial_id"], row.get("trial_dir"))
        epoch = int(row["best_epoch"]) if pd.notna(row["best_epoch"]) else 0
        images = probe_images(folder, epoch)
        if not images:
            section.blocks.append(_note(f"trial {row['trial_id']}: no probe images recorded"))
            continue
        section.blocks.append(f"<h3>trial {html.escape(row['trial_id'])}, best epoch {epoch}</h3>")
        gallery = [
            _image_html(image.png, image.name, f"{image.name}, epoch {image.epoch}")
            for image in images
        ]
        section.blocks.append(f"<div class=gallery>{''.join(gallery)}</div>")
    return section


def variants_section(context: Context) -> Section:
    section = Section(
        "variants",
        "Variant comparison",
        f"Trials grouped by each categorical hyperparameter that varies, by experiment "
        f"when several are analyzed, and by each split; best and median best "
        f"{context.metric}, and the median best of every other metric (diverged trials "
        "excluded from the values, counted under failed).",
    )
    groupings: list[str | tables.Split] = []
    if context.trials["experiment"].nunique() > 1:
        groupings.append("experiment")
    categorical = tables.categorical_params(context.trials, context.params, context.study)
    groupings += [p for p in categorical if context.trials[p].nunique() > 1]
    groupings += context.splits
    if not groupings:
        section.blocks.append(
            _note(
                "no categorical hyperparameter varies and no split was given "
                "(pass --split, for example 'content_decay > 0')"
            )
        )
    for by in groupings:
        name = by.label if isinstance(by, tables.Split) else by
        slug = _slug(name)
        summary = tables.variant_summary(context.trials, by, context.metric)
        section.blocks.append(f"<h3>{html.escape(name)}</h3>")
        section.blocks.append(context.files.table(f"variants_{slug}", summary))
        groups = by.labels(context.trials) if isinstance(by, tables.Split) else context.trials[by]
        figure = plots.plot_variants(context.trials, groups, context.metric, name)
        section.blocks.append(context.files.figure(f"variants_{slug}", figure))
    return section


SECTIONS = (
    best_section,
    importance_section,
    loss_section,
    curves_section,
    rungs_section,
    params_section,
    neighbours_section,
    probes_section,
    variants_section,
)

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f2f2f2; }
.scroll { overflow-x: auto; margin: 0.5em 0; }
img { max-width: 100%; }
figure { margin: 0.8em 0; } figcaption, .caption { font-size: 0.85em; color: #555; }
.note { color: #8a5a00; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery img { image-rendering: pixelated; width: 252px; }
nav a { margin-right: 1em; }
"""


def _overview(context: Context) -> str:
    rows = []
    for e in context.experiments:
        counts = e.trials["status"].value_counts()
        rows.append(
            {
                "experiment": e.name,
                "folder": str(e.folder),
                "metric": f"{e.metric} ({e.mode})",
                "space": e.info.get("space"),
                "scheduler": e.info.get("scheduler"),
                "max_epochs": e.info.get("max_epochs"),
                "trials": len(e.trials),
                "status": ", ".join(f"{k} {v}" for k, v in counts.items()),
            }
        )
    return _table_html(pd.DataFrame(rows))


def render_html(context: Context, sections: list[Section]) -> str:
    """Return the report page: an overview table, a contents line and every section."""
    names = ", ".join(e.name for e in context.experiments)
    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>glo-search report: {html.escape(names)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>glo-search report: {html.escape(names)}</h1>",
        f"<p>Sorted by {html.escape(context.metric)} "
        f"({METRICS[context.metric].mode}); written {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        _overview(context),
        f"<nav>{nav}</nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>')
        parts.append(f"<p>{html.escape(section.lead)}</p>")
        parts.extend(section.blocks)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _build_section(build, context: Context) -> Section:
    """Build one section; data it cannot use becomes a note, so the rest still renders."""
    started = time.perf_counter()
    try:
        section = build(context)
    except (ValueError, KeyError) as error:
        # A sweep still running or a folder from an older version can lack rows or columns.
        logger.warning("%s failed: %s", build.__name__, error)
        title = build.__name__.removesuffix("_section")
        section = Section(title, title, "")
        section.blocks.append(_note(f"this section could not be built: {error}"))
    logger.debug("%s: %.2f s", build.__name__, time.perf_counter() - started)
    return section


def analyze(
    paths: str | Path | Iterable[str | Path],
    out: str | Path,
    metric: str | None = None,
    splits: Iterable[str | tables.Split] = (),
    top: int = 5,
) -> Path:
    """Analyze experiment folders and write report.html, PNG plots and CSV tables to ``out``.

    Args:
        paths: one experiment folder or several.
        out: output folder, created if missing. Files of an earlier report there are
            replaced, and those this report does not write again are removed.
        metric: metric that ranks trials; default: the first experiment's sweep metric.
        splits: extra two-way groupings, such as ``"content_decay > 0"``; default: that
            split whenever some trials have content_decay 0 and others a positive value.
        top: trials in the learning curves and probe galleries (twice as many in the
            best-trials table).

    Returns the path of report.html.
    """
    if top < 1:
        raise ValueError(f"invalid top={top}: must be >= 1")
    experiments = load_experiments(paths)
    metric = metric or experiments[0].metric
    tables._check_metric(metric)
    trials, epochs = combine(experiments)
    if trials.empty:
        raise ValueError(f"{experiments[0].folder}: trials.parquet has no trials to analyze")
    swept_otherwise = [e.name for e in experiments if e.metric != metric]
    if swept_otherwise:
        # Their best_epoch and at_best_ columns follow the metric they were swept by.
        others = trials["experiment"].isin(swept_otherwise)
        trials.loc[others] = tables.ranked_by(trials[others], epochs, metric)
    parsed = [s if isinstance(s, tables.Split) else tables.parse_split(s) for s in splits]
    for split in parsed:
        split.labels(trials)  # reject a split on a missing column before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = next((e.study() for e in experiments if e.study() is not None), None)
    context = Context(
        experiments=experiments,
        trials=trials,
        epochs=epochs,
        metric=metric,
        top=top,
        splits=parsed or tables.default_splits(trials),
        params=tables.searched_params(trials, study),
        files=ReportFiles(out),
    )
    earlier = report_files(out)
    sections = [_build_section(build, context) for build in SECTIONS]
    report = out / REPORT_FILE
    atomic_write_text(report, render_html(context, sections))
    written = {path.name for path in context.files.files} | {REPORT_FILE}
    for name in sorted(earlier - written):
        (out / name).unlink(missing_ok=True)
    atomic_write_text(out / MANIFEST_FILE, "".join(f"{name}\n" for name in sorted(written)))
    logger.info("wrote %s with %d figures and tables", report, len(context.files.files))
    return report


def report_files(out: Path) -> set[str]:
    """Return the names of the files that the last report in ``out`` wrote, or an empty set."""
    manifest = Path(out) / MANIFEST_FILE
    if not manifest.is_file():
        return set()
    # Plain names only: a manifest edited to name ../something must not delete it.
    names = manifest.read_text().split("\n")
    return {name for name in names if name and name == Path(name).name and name[0] != "."}
