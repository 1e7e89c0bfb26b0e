"""Command-line interface: a thin layer over glo_search.search and glo_search.single."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from glo_search.config import FIELDS, ConfigError, TrainConfig, flag, from_dict
from glo_search.data import DataError
from glo_search.metrics import METRICS

# The same as glo_search.search.DEFAULT_MAX_FAILURES, which the CLI does not import at
# start because that module loads Ray.
DEFAULT_MAX_FAILURES = 2

logger = logging.getLogger("glo_search")

DEFAULTS = TrainConfig()
# Fields with their own sweep flags: --max-epochs sets epochs, --seed seeds both.
SWEEP_OWN_FLAGS = ("epochs", "seed")


# Sweep defaults that differ from TrainConfig's (glo_search.search.default_eval_every).
SWEEP_DEFAULT_TEXT = {
    "eval_every": "with --scheduler asha, --max-epochs, so only the rungs and the last "
    "epoch; with any other scheduler, 1"
}


def _field_help(name: str, sweep: bool = False) -> str:
    meta = FIELDS[name].metadata
    unit = f"; unit: {meta['unit']}" if meta["unit"] else ""
    default = repr(getattr(DEFAULTS, name))
    if sweep:
        default = SWEEP_DEFAULT_TEXT.get(name, default)
    return f"{meta['help']} (default: {default}{unit})"


def _add_config_flags(parser: argparse.ArgumentParser, names, sweep: bool) -> None:
    group = parser.add_argument_group(
        "hyperparameters" if not sweep else "fixed hyperparameters",
        None if not sweep else "values every trial uses unless the search space varies them",
    )
    for name in names:
        field_type = FIELDS[name].type
        if field_type == "bool":
            group.add_argument(
                flag(name),
                dest=name,
                action="store_true",
                default=None if sweep else getattr(DEFAULTS, name),
                help=_field_help(name, sweep),
            )
            continue
        kind = {"int": int, "float": float, "str": str}[field_type]
        group.add_argument(
            flag(name),
            dest=name,
            type=kind,
            metavar=name.upper(),
            default=None if sweep else getattr(DEFAULTS, name),
            help=_field_help(name, sweep),
        )


def _path(text: str) -> Path:
    """argparse type for a file or folder path, which must not be blank."""
    return Path(_location(text))


def _location(text: str) -> str:
    """argparse type for a path or storage URI, which must not be blank.

    Path('') is the current folder, so a blank value from an unset shell variable would
    otherwise write into, or read from, wherever the command runs.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is blank; name a file or folder ('.' for the current folder)"
        )
    return text


def _metric_help() -> str:
    return f"metric to optimize, one of {', '.join(METRICS)} (default: disentanglement)"


# Commands whose -q also hides Ray Tune's console output.
TUNE_COMMANDS = ("sweep", "resume")


def _subcommand(commands, name: str, **options) -> argparse.ArgumentParser:
    """Add a subcommand that also takes -q after its name."""
    quiet = argparse.ArgumentParser(add_help=False)
    # SUPPRESS leaves the namespace alone unless -q is given, so a -q before the
    # subcommand's name still counts.
    quiet.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log warnings and errors only"
        + (", and show no Ray Tune table" if name in TUNE_COMMANDS else "")
        + " (default: off)",
    )
    return commands.add_parser(name, parents=[quiet], **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glo-search",
        description="Hyperparameter search for class/content disentanglement by latent "
        "optimization (GLO) on MNIST digits, with Ray Tune, Optuna and ASHA.",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="log warnings and errors only, and sweep and resume show no Ray Tune table "
        "(default: off)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_train(commands)
    _add_sweep(commands)
    _add_analyze(commands)
    _add_probe(commands)
    _add_resume(commands)
    _add_study(commands)
    _subcommand(
        commands,
        "spaces",
        help="list the named search spaces",
        description="List the named search spaces and what each varies.",
    )
    _subcommand(
        commands,
        "classifier",
        help="show (and train on first use) the reference digit classifier",
        description="Show the reference digit classifier's held-out accuracy and cache "
        "path, training it first if it is not cached.",
    )
    return parser


def _add_train(commands) -> None:
    train = _subcommand(
        commands,
        "train",
        help="train one configuration (no Ray) with TensorBoard logs and checkpoints",
        description="Train one GLO configuration and write TensorBoard logs, config.json, "
        "epochs.parquet, best.pt (best epoch by --metric) and last.pt into --out.",
    )
    train.add_argument(
        "--out",
        type=_path,
        default=None,
        help="output folder (default: glo-runs/train-<time>)",
    )
    train.add_argument(
        "--metric",
        default="disentanglement",
        choices=list(METRICS),
        metavar="METRIC",
        help=_metric_help() + "; selects best.pt",
    )
    train.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="device (default: cuda when available, else cpu)",
    )
    _add_config_flags(train, FIELDS, sweep=False)


def _add_sweep(commands) -> None:
    sweep = _subcommand(
        commands,
        "sweep",
        help="search hyperparameters with Ray Tune, Optuna and ASHA",
        description="Run a hyperparameter sweep: Optuna proposes configurations from the "
        "search space, ASHA stops weak trials early, and results go to "
        "STORAGE/NAME (trials.parquet, epochs.parquet, optuna.db, one folder per trial).",
    )
    _add_search_flags(sweep.add_argument_group("search"))
    _add_schedule_flags(sweep.add_argument_group("early stopping"))
    _add_resource_flags(sweep.add_argument_group("resources and output"))
    _add_ray_flags(sweep)
    _add_config_flags(sweep, [n for n in FIELDS if n not in SWEEP_OWN_FLAGS], sweep=True)
    # A sweep's trials share --max-epochs; catch the train command's flag with a hint.
    sweep.add_argument("--epochs", dest="train_epochs", default=None, help=argparse.SUPPRESS)


def _add_search_flags(group) -> None:
    group.add_argument(
        "--space",
        default="default",
        help="search space name (see `glo-search spaces`) or a .py file "
        "defining SPACE (default: default)",
    )
    group.add_argument(
        "--num-samples", type=int, default=16, help="number of trials (default: 16)"
    )
    group.add_argument(
        "--metric",
        default="disentanglement",
        choices=list(METRICS),
        metavar="METRIC",
        help=_metric_help(),
    )
    group.add_argument(
        "--sampler",
        default="tpe",
        choices=["tpe", "random"],
        help="Optuna sampler (default: tpe)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sampler and of every trial's training (default: 0)",
    )
    group.add_argument(
        "--points",
        type=_path,
        default=None,
        metavar="FILE",
        help="JSON or YAML list of configurations to evaluate first (warm start); keys "
        "must be keys the search space varies (default: none)",
    )


def _add_schedule_flags(group) -> None:
    group.add_argument(
        "--max-epochs",
        type=int,
        default=20,
        help="epochs of a trial that is never stopped early; ASHA's max_t "
        "(default: 20; unit: epochs)",
    )
    group.add_argument(
        "--scheduler",
        default="asha",
        choices=["asha", "hyperband", "median", "fifo"],
        help="early-stopping scheduler (default: asha)",
    )
    group.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="epochs before a trial can be stopped (ASHA, median) "
        "(default: 2, or --max-epochs when smaller; unit: epochs)",
    )
    group.add_argument(
        "--reduction-factor",
        type=float,
        default=3,
        help="ASHA/HyperBand eta: a rung keeps the best 1/eta of trials (default: 3)",
    )


def _add_resource_flags(group) -> None:
    group.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials running at once (default: as many as CPUs/GPUs allow)",
    )
    group.add_argument(
        "--cpus-per-trial",
        type=float,
        default=1,
        help="CPUs reserved per trial, also its torch threads (default: 1)",
    )
    group.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0,
        help="GPUs per trial, fractions allowed, e.g. 0.25 (default: 0)",
    )
    group.add_argument(
        "--max-failures",
        type=int,
        default=DEFAULT_MAX_FAILURES,
        help="times a crashed trial is restarted from its latest checkpoint before it "
        f"counts as an error (default: {DEFAULT_MAX_FAILURES})",
    )
    group.add_argument(
        "--no-reuse-workers",
        dest="reuse_workers",
        action="store_false",
        help="start a new Ray worker process for every trial instead of running the next "
        "trial in a finished trial's process (slower; for trials that leave state behind; "
        "default: reuse workers)",
    )
    group.add_argument(
        "--storage",
        type=_location,
        default="glo-runs",
        help="folder, or URI that pyarrow.fs understands (file:///..., s3://bucket/...), "
        "under which the experiment folder is made; on a cluster every node must reach "
        "it (default: glo-runs)",
    )
    group.add_argument(
        "--name",
        default=None,
        help="experiment folder name (default: <space>-<date>-<time>)",
    )


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address, e.g. 10.0.0.5:6379 (default: start Ray on this machine)",
    )
    parser.add_argument(
        "--dashboard",
        nargs="?",
        const="127.0.0.1",
        default=None,
        metavar="HOST",
        help="start Ray's dashboard (needs pip install 'ray[default]'), bound to HOST "
        "(default when given without HOST: 127.0.0.1, this machine only); off by default",
    )


def _add_study(commands) -> None:
    study = _subcommand(
        commands,
        "study",
        help="re-run the hand-tuned study and write FINDINGS.md with a verdict per claim",
        description="Run the hand-tuned study's experiments (loss, class_dim, content_dim, "
        "noise_std and content_decay, each varied around the reference setting over 3 "
        "seeds) as sweeps without early stopping, then write FINDINGS.md, "
        "study_report.html and report/ into --out. Run again with the same --out to "
        "continue an interrupted study.",
    )
    study.add_argument(
        "--quick",
        action="store_true",
        help="500 digits and 8 epochs (16 for content_decay) instead of 2,000 digits and "
        "50 epochs (100): about 15 minutes on 2 cores instead of about 2 hours "
        "(default: off)",
    )
    study.add_argument(
        "--out",
        type=_path,
        default=None,
        help="study folder (default: glo-runs/study-full, or glo-runs/study-quick)",
    )


def _run_study(args: argparse.Namespace) -> int:
    from glo_search.study import FULL, QUICK, run_study
    from glo_search.study_report import write_outputs

    plan = QUICK if args.quick else FULL
    out = (args.out or Path("glo-runs") / f"study-{plan.name}").resolve()
    started = time.monotonic()
    folders = run_study(out, plan)
    command = "glo-search study" + (" --quick" if args.quick else "")
    findings, report = write_outputs(folders, out, plan, time.monotonic() - started, command)
    print(findings.read_text())
    print(f"findings: {findings}\nreport: {report}")
    return 0


def _add_resume(commands) -> None:
    resume = _subcommand(
        commands,
        "resume",
        help="continue an interrupted sweep from its experiment folder",
        description="Continue a sweep whose driver stopped: finished trials are kept, "
        "unfinished ones continue from their latest checkpoint, and the Optuna study "
        "keeps its history. Resuming unpickles state stored in the folder, so resume "
        "only folders that you or your sweeps wrote.",
    )
    resume.add_argument(
        "experiment", type=_location, metavar="DIR", help="experiment folder (path or URI)"
    )
    _add_ray_flags(resume)


def _add_analyze(commands) -> None:
    analyze = _subcommand(
        commands,
        "analyze",
        help="write an HTML report, PNG plots and CSV tables for experiment folders",
        description="Analyze one or several experiment folders of `glo-search sweep` "
        "(trials.parquet, epochs.parquet, experiment.json, optuna.db) without Ray, and write "
        "report.html (self-contained), PNG plots and CSV tables into --out.",
    )
    analyze.add_argument(
        "experiments", nargs="+", type=_path, metavar="EXPERIMENT_DIR", help="experiment folder"
    )
    analyze.add_argument(
        "--out", type=_path, required=True, help="output folder, created if missing (required)"
    )
    analyze.add_argument(
        "--metric",
        default=None,
        choices=list(METRICS),
        metavar="METRIC",
        help=f"metric that ranks trials, one of {', '.join(METRICS)} "
        "(default: the first experiment's sweep metric)",
    )
    analyze.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="EXPR",
        help="extra grouping of the variant comparison, COLUMN OP VALUE with OP one of "
        "== != > >= < <=, e.g. 'content_decay > 0'; repeatable (default: 'content_decay > 0' "
        "when some trials have 0 and others a positive value)",
    )
    analyze.add_argument(
        "--top",
        type=int,
        default=5,
        help="trials in the learning curves and probe galleries (default: 5)",
    )


def _run_analyze(args: argparse.Namespace) -> int:
    from analysis import AnalysisError, analyze

    _check_out_folder(args.out, must_be_empty=False)
    _check_report_folder(args.out)
    try:
        report = analyze(args.experiments, args.out, args.metric, args.split, args.top)
    except (AnalysisError, ValueError) as error:
        print(f"glo-search: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report.resolve()}")
    return 0


def _check_report_folder(out: Path) -> None:
    """Reject an --out folder that contains files, unless an earlier report wrote them."""
    from analysis.report import MANIFEST_FILE, REPORT_FILE

    earlier_report = (out / MANIFEST_FILE).is_file() or (out / REPORT_FILE).is_file()
    if out.is_dir() and any(out.iterdir()) and not earlier_report:
        raise ConfigError(
            f"invalid --out {out}: the folder contains files that no earlier report wrote; "
            "name a new folder, or the folder of an earlier report to replace it"
        )


def _add_probe(commands) -> None:
    probe = _subcommand(
        commands,
        "probe",
        help="draw one probe triplet and its activation maps from a checkpoint",
        description="Render the content code of one training image with the class code "
        "of one class, and write the triplet [class image | content image | output] and "
        "the generator's 16 activation maps (14x14) as PNG files.",
    )
    probe.add_argument(
        "checkpoint",
        type=_path,
        metavar="CHECKPOINT",
        help="a trainer.pt or best.pt file, a Ray checkpoint folder, the --out folder "
        "of `glo-search train`, a sweep's trial folder (its best checkpoint) or a sweep's "
        "experiment folder (the best trial's best checkpoint)",
    )
    probe.add_argument(
        "--class-label",
        type=int,
        required=True,
        help="class whose class code is used, 0-9 (required)",
    )
    probe.add_argument(
        "--content-index",
        type=int,
        required=True,
        help="index of the training image whose content code is used (required)",
    )
    probe.add_argument(
        "--out", type=_path, default=Path("."), help="output folder (default: current folder)"
    )
    probe.add_argument(
        "--scale",
        type=int,
        default=4,
        help="enlargement factor of the PNG files, 1 for 28-pixel digits, at most 32 (default: 4)",
    )
    probe.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="device (default: cpu)",
    )


def _config_values(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "invalid device='cuda' (--device): torch finds no CUDA GPU on this "
                "machine; use --device cpu or leave --device out"
            )


def _check_out_folder(out: Path, must_be_empty: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"invalid --out {out}: it is a file; name a folder")
    if must_be_empty and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"invalid --out {out}: the folder is not empty and would mix two runs; "
            "name a new folder"
        )


def _run_train(args: argparse.Namespace) -> int:
    from glo_search.single import train_run

    config = from_dict(_config_values(args, FIELDS))
    if config.perceptual_weights and config.loss != "perceptual":
        logger.warning(
            "--perceptual-weights is ignored: it is used only with --loss perceptual, "
            "and the loss is %s",
            config.loss,
        )
    out = args.out or Path("glo-runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_device(args.device)
    _check_out_folder(out, must_be_empty=True)
    history = train_run(config, out, metric=args.metric, device=args.device)
    epochs = "epoch" if len(history) == 1 else "epochs"
    print(f"\nwrote {len(history)} evaluated {epochs} to {out.resolve()}")
    print(f"TensorBoard: tensorboard --logdir {out.resolve() / 'tensorboard'}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from glo_search.search import make_scheduler, sweep

    if args.train_epochs is not None:
        raise ConfigError(
            f"--epochs {args.train_epochs} is for `glo-search train`; a sweep sets every "
            "trial's epochs with --max-epochs"
        )
    fixed = _config_values(args, [n for n in FIELDS if n not in SWEEP_OWN_FLAGS])
    fixed["seed"] = args.seed
    scheduler = make_scheduler(
        args.scheduler, args.max_epochs, args.grace_period, args.reduction_factor
    )
    grid = sweep(
        args.space,
        metric=args.metric,
        num_samples=args.num_samples,
        max_epochs=args.max_epochs,
        base_config=fixed,
        scheduler=scheduler,
        sampler=args.sampler,
        storage=args.storage,
        name=args.name,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        seed=args.seed,
        address=args.address,
        max_failures=args.max_failures,
        points=args.points,
        dashboard_host=args.dashboard,
        reuse_actors=args.reuse_workers,
        verbose=0 if args.quiet else 1,  # Tune's table of trial statuses
    )
    from glo_search.storage import ExperimentLocation

    return _print_summary(ExperimentLocation.of_result_grid(grid), args.metric)


def _run_resume(args: argparse.Namespace) -> int:
    from glo_search.resume import finished, read_settings, resume
    from glo_search.storage import ExperimentLocation, open_experiment

    location = open_experiment(args.experiment)
    if finished(location):
        print(f"every trial of the sweep in {location.uri} had finished; nothing to resume")
    else:
        grid = resume(
            args.experiment,
            address=args.address,
            dashboard_host=args.dashboard,
            verbose=0 if args.quiet else 1,  # as for sweep; Tune would keep the sweep's
        )
        location = ExperimentLocation.of_result_grid(grid)
    return _print_summary(location, read_settings(location)["metric"])


# Exit status of a sweep that stopped before all its trials finished, as for a shell
# command ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_STATUS = 130


def _print_summary(location, metric: str) -> int:
    """Print the best trials and where the results are, and return the exit status.

    A sweep with fewer finished trials than it requested, or with trials still marked
    running, was interrupted (for example by Ctrl-C). Its table is then marked partial,
    and the exit status is INTERRUPTED_EXIT_STATUS. A sweep whose trials all failed
    exits with status 1.
    """
    from glo_search.results import (
        FINAL_STATUSES,
        best_trial_summary,
        best_trials_table,
        read_experiment,
    )
    from glo_search.resume import read_settings
    from glo_search.searcher import STUDY_FILE

    trials, epochs = read_experiment(location)
    requested = read_settings(location)["num_samples"]
    statuses = trials["status"] if "status" in trials else []
    finished = sum(status in FINAL_STATUSES for status in statuses)
    interrupted = finished < requested or "running" in set(statuses)
    print()
    if interrupted:
        print("partial results: the sweep stopped before all its trials finished")
    print(best_trials_table(trials, metric))
    if not trials.empty:
        print(best_trial_summary(trials, epochs, metric))
    print(f"\nexperiment folder: {location.uri}")
    print(f"Optuna study: {location.uri}/{STUDY_FILE}")
    errors = sum(status == "error" for status in statuses)
    if errors:
        print(f"{errors} trial(s) failed; see the error.txt in their trial folders")
    if not interrupted:
        # A sweep in which every trial failed produced nothing to compare.
        all_failed = len(statuses) > 0 and set(statuses) == {"error"}
        return 1 if all_failed else 0
    print(
        f"sweep interrupted: {finished} of {requested} trials finished; "
        f"continue with: glo-search resume {shlex.quote(location.uri)}"
    )
    return INTERRUPTED_EXIT_STATUS


def _run_probe(args: argparse.Namespace) -> int:
    from glo_search import probes

    _check_device(args.device)
    _check_out_folder(args.out, must_be_empty=False)
    try:
        checkpoint = probes.checkpoint_file(args.checkpoint)
        trainer = probes.load_for_probes(checkpoint, args.device)
        paths = probes.write_probe(
            trainer, args.class_label, args.content_index, args.out, args.scale
        )
    except probes.ProbeError as error:
        print(f"glo-search: error: {error}", file=sys.stderr)
        return 2
    source_label = int(trainer.dataset.labels[args.content_index])
    print(
        f"content of image {args.content_index} (label {source_label}) as class "
        f"{args.class_label}, checkpoint of epoch {trainer.epoch} ({checkpoint})"
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def _run_spaces(args: argparse.Namespace) -> int:
    import search_spaces

    for name in search_spaces.names():
        print(f"{name:10s} {search_spaces.load(name).description}")
    return 0


def _run_classifier(args: argparse.Namespace) -> int:
    from glo_search import classifier

    info = classifier.load_info()
    print(
        f"held-out accuracy: {info.held_out_accuracy:.4f} on shipped test-split digits "
        f"{info.held_out_indices[0]}-{info.held_out_indices[1] - 1}"
    )
    print(
        f"trained on digits {info.train_indices[0]}-{info.train_indices[1] - 1}, "
        f"{info.epochs} epochs"
    )
    print(f"weights: {info.weights}")
    return 0


COMMANDS = {
    "train": _run_train,
    "sweep": _run_sweep,
    "resume": _run_resume,
    "study": _run_study,
    "analyze": _run_analyze,
    "probe": _run_probe,
    "spaces": _run_spaces,
    "classifier": _run_classifier,
}


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The top-level parser would print its own usage, which lists no options of
        # the command that was given.
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # INFO lines of other packages that tell a user nothing: Alembic's set-up of its
    # plugins when a study file opens, and TensorBoard's scan of each trial's folder.
    for name in ("alembic", "tensorboard"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.quiet:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as error:
        print(f"glo-search: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glo-search: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout (e.g. `| head`) closed early; exit without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        # A path that cannot be made or written (a file in place of a folder, /proc, a
        # full disk): the system's message names the path.
        print(f"glo-search: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
