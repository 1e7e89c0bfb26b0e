"""Every bad input a user can give the CLI, the message they see, and no half-made folder.

docs/bad_inputs.md lists the same cases with the message each prints; each test checks
its message against that table, so the page cannot drift from the code. After changing a
message, rewrite the page with:

    python tests/test_bad_inputs.py
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from glo_search.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
SMALL = "--num-images 100 --swap-sources 20"


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    command: str  # CLI arguments; {tmp} is the case's own folder
    fragment: str  # a part of the message that names the culprit
    files: tuple[tuple[str, str], ...] = ()  # (path under {tmp}, content) to create first


SPACE_HEADER = "from optuna.distributions import IntDistribution, FloatDistribution\n"
REPORT_POINT = {"class_dim": 7, "content_dim": 25, "noise_std": 0.3, "content_decay": 0.0}

# The experiment.json of a sweep that stopped before Ray Tune saved any state.
EARLY_SETTINGS = {
    "base_config": {},
    "metric": "disentanglement",
    "mode": "max",
    "num_samples": 2,
    "max_epochs": 2,
    "cpus_per_trial": 1,
    "gpus_per_trial": 0,
}

CASES = [
    Case("dim-below-1", "class code size below 1", "train --class-dim 0", "class_dim=0"),
    Case("negative-seed", "negative seed", "train --seed -1", "seed=-1"),
    Case(
        "train-out-not-empty",
        "train into a folder that holds an earlier run",
        "train --epochs 1 --out {tmp}/runs/taken",
        "not empty",
        (("runs/taken/config.json", "{}"),),
    ),
    Case(
        "out-is-file",
        "--out naming a file",
        "train --epochs 1 --out {tmp}/notes.txt",
        "it is a file",
        (("notes.txt", "earlier notes"),),
    ),
    Case("out-blank", "blank --out", "train --epochs 1 --out ''", "is blank"),
    Case(
        "probe-not-checkpoint",
        "probe of a file that is not a checkpoint",
        "probe {tmp}/model.pth --class-label 1 --content-index 2",
        "cannot read checkpoint",
        (("model.pth", "not a checkpoint"),),
    ),
    Case("sweep-epochs", "--epochs given to a sweep", "sweep --epochs 3", "--max-epochs"),
    Case(
        "name-with-slash",
        "experiment name that leaves the storage folder",
        "sweep --name ../escape",
        "'../escape'",
    ),
    Case(
        "empty-name",
        "empty experiment name",
        "sweep --name ''",
        "invalid --name ''",
    ),
    Case(
        "name-with-spaces",
        "experiment name with a space at its end",
        "sweep --name 'run '",
        "'run '",
    ),
    Case(
        "name-too-long",
        "experiment name longer than a file name may be",
        "sweep --name " + "n" * 256,
        "longer than 255 bytes",
    ),
    Case(
        "too-many-cpus",
        "trial that needs more CPUs than the machine has",
        "sweep --cpus-per-trial 4096",
        "cpus_per_trial=4096",
    ),
    Case(
        "address-refused",
        "cluster address where nothing listens",
        "sweep --address 127.0.0.1:1",
        "127.0.0.1:1",
    ),
    Case("address-malformed", "cluster address without a port", "sweep --address head", "'head'"),
    Case(
        "sweep-vgg-text",
        "perceptual weights file that is not a torch file, in a sweep",
        "sweep --loss perceptual --perceptual-weights {tmp}/vgg19.pth",
        "perceptual_weights=",
        (("vgg19.pth", "not weights"),),
    ),
    Case(
        "out-under-file",
        "output folder inside a file",
        "train --out {tmp}/afile.txt/run",
        "Not a directory",
        (("afile.txt", "text"),),
    ),
    Case(
        "points-not-text",
        "points file that is not UTF-8",
        "sweep --points {tmp}/points.json",
        "not UTF-8",
        (("points.json", "\udcff"),),
    ),
    Case("negative-sigma", "negative content noise", "train --noise-std -1", "noise_std=-1"),
    Case("unknown-loss", "unknown reconstruction loss", "train --loss huber", "huber"),
    Case("zero-lr", "learning rate of 0", "train --lr-generator 0", "lr_generator=0"),
    Case("unknown-space", "unknown search space name", "sweep --space nope", "'nope'"),
    Case(
        "space-unknown-key",
        "search space file with a key that is not a config field",
        "sweep --space {tmp}/space.py",
        "'dropout'",
        (("space.py", SPACE_HEADER + "SPACE = {'dropout': FloatDistribution(0, 1)}\n"),),
    ),
    Case(
        "space-bad-range",
        "search space file whose range includes an invalid value",
        "sweep --space {tmp}/space.py",
        "class_dim=0",
        (("space.py", SPACE_HEADER + "SPACE = {'class_dim': IntDistribution(0, 8)}\n"),),
    ),
    Case(
        "space-syntax-error",
        "search space file that is not valid Python",
        "sweep --space {tmp}/space.py",
        "SyntaxError",
        (("space.py", "SPACE = {'class_dim': \n"),),
    ),
    Case(
        "space-raises",
        "define-by-run search space that raises",
        "sweep --space {tmp}/space.py",
        "ZeroDivisionError",
        (("space.py", "def SPACE(trial):\n    return 1 / 0\n"),),
    ),
    Case(
        "space-no-SPACE",
        "search space file without SPACE",
        "sweep --space {tmp}/space.py",
        "defines no SPACE",
        (("space.py", "DESCRIPTION = 'empty'\n"),),
    ),
    Case(
        "point-unknown-key",
        "warm-start point with a key the space does not vary",
        "sweep --points {tmp}/points.json",
        "'lr'",
        (("points.json", json.dumps([{"lr": 0.1}])),),
    ),
    Case(
        "point-not-a-choice",
        "warm-start point with a value the space cannot take",
        "sweep --space report --points {tmp}/points.yaml",
        "class_dim=7",
        (("points.yaml", json.dumps([REPORT_POINT])),),
    ),
    Case(
        "point-missing-key",
        "warm-start point that lacks a key of a dict space",
        "sweep --space report --points {tmp}/points.json",
        "'content_decay'",
        (
            (
                "points.json",
                json.dumps([{k: v for k, v in REPORT_POINT.items() if k != "content_decay"}]),
            ),
        ),
    ),
    Case(
        "points-not-a-list",
        "points file that holds one mapping, not a list",
        "sweep --points {tmp}/points.json",
        "list",
        (("points.json", json.dumps({"class_dim": 5})),),
    ),
    Case(
        "points-bad-yaml",
        "points file that is not valid YAML",
        "sweep --points {tmp}/points.yaml",
        "points.yaml",
        (("points.yaml", "- {class_dim: 5\n"),),
    ),
    Case(
        "points-missing-file",
        "points file that does not exist",
        "sweep --points {tmp}/absent.json",
        "absent.json",
    ),
    Case(
        "too-many-points",
        "more warm-start points than trials",
        "sweep --num-samples 1 --points {tmp}/points.json",
        "--num-samples",
        (("points.json", json.dumps([{"class_dim": 5}, {"class_dim": 6}])),),
    ),
    Case(
        "unknown-metric",
        "a metric the trainable does not report",
        "sweep --metric accuracy",
        "'accuracy'",
    ),
    Case(
        "corrupt-idx",
        "corrupt MNIST IDX file",
        "sweep --dataset mnist --split test --data-root {tmp}/data",
        "not valid IDX",
        tuple(
            (f"data/MNIST/raw/{name}", "not an IDX file")
            for name in (
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
            )
        ),
    ),
    Case(
        "missing-data",
        "missing MNIST folder",
        "sweep --dataset mnist --split test --data-root {tmp}/absent",
        "--download",
    ),
    Case(
        "unwritable-storage",
        "storage that cannot hold folders (a regular file)",
        "sweep --storage {tmp}/storage.txt --name exp",
        "storage.txt",
        (("storage.txt", "a file, not a folder"),),
    ),
    Case(
        "unknown-uri", "storage URI of an unknown scheme", "sweep --storage foo://bar", "foo://bar"
    ),
    Case("storage-blank", "blank storage folder", "sweep --storage ''", "is blank"),
    Case(
        "negative-retries",
        "negative number of retries",
        "sweep --max-failures -1",
        "max_failures=-1",
    ),
    Case(
        "folder-taken",
        "experiment name whose folder already holds files",
        "sweep --name taken",
        "glo-search resume",
        (("runs/taken/notes.txt", "earlier work"),),
    ),
    Case(
        "dashboard-on-cluster",
        "--dashboard together with --address",
        "sweep --dashboard --address 127.0.0.2:6379",
        "--dashboard",
    ),
    Case(
        "resume-missing", "resume of a folder that does not exist", "resume {tmp}/absent", "absent"
    ),
    Case(
        "resume-not-experiment",
        "resume of a folder that is not an experiment",
        "resume {tmp}/other",
        "experiment.json",
        (("other/notes.txt", "not a sweep"),),
    ),
    Case(
        "resume-never-started",
        "resume of a sweep that stopped before its first trial",
        "resume {tmp}/early",
        "nothing to resume",
        (("early/experiment.json", json.dumps(EARLY_SETTINGS)),),
    ),
    Case(
        "resume-damaged-trials",
        "resume of a folder whose trials.parquet is damaged",
        "resume {tmp}/early",
        "trials.parquet is damaged",
        (
            ("early/experiment.json", json.dumps(EARLY_SETTINGS)),
            ("early/tuner.pkl", "saved state"),
            ("early/experiment_state-2026-01-01_00-00-00.json", "{}"),
            ("early/trials.parquet", "not parquet"),
        ),
    ),
    Case(
        "resume-bad-settings",
        "resume of a folder whose experiment.json lacks settings",
        "resume {tmp}/early",
        "missing base_config",
        (("early/experiment.json", "{}"),),
    ),
]


def command_line(case: Case, tmp: Path) -> list[str]:
    command = case.command.format(tmp=tmp)
    if command.startswith("sweep") and "--storage" not in command:
        command += f" --storage {tmp}/runs"
    if command.startswith("sweep"):
        command += f" {SMALL} --num-samples 2" if "--num-samples" not in command else f" {SMALL}"
    elif command.startswith("train"):
        command += "" if "--epochs" in command else " --epochs 1"
        command += "" if "--out" in command else f" --out {tmp}/train"
    return shlex.split(command)


def run_case(case: Case, tmp: Path, capsys) -> tuple[int, str]:
    """Run the CLI in this process; return its exit status and last stderr line."""
    for relative, content in case.files:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, errors="surrogateescape")  # "\\udcff" writes byte 0xff
    try:
        status = main(command_line(case, tmp))
    except SystemExit as exit:  # argparse rejects choices itself
        status = exit.code
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def shown(text: str, tmp: Path) -> str:
    """Return the message as the table shows it, without temporary paths or a CPU count."""
    text = re.sub(r"this machine has \d+ CPUs", "this machine has <n> CPUs", text)
    return text.replace(str(tmp), "<tmp>")


def doc_messages() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `([\w-]+)` \|.*\| (.*) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).replace("\\|", "|")
    return rows


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_message(case, tmp_path, capsys):
    status, message = run_case(case, tmp_path, capsys)
    assert status == 2
    assert message.startswith("glo-search")
    assert case.fragment in message
    assert shown(message, tmp_path) == doc_messages().get(case.id), (
        "docs/bad_inputs.md is out of date; rewrite it with: python tests/test_bad_inputs.py"
    )
    runs = tmp_path / "runs"
    leftover = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
    assert leftover in ([], ["taken"]), f"a failed start left {leftover} in the storage folder"


def test_doc_lists_every_case():
    assert set(doc_messages()) == {case.id for case in CASES}


def _row(case: Case, message: str) -> str:
    command = "glo-search " + shlex.join(command_line(case, Path("<tmp>")))
    cells = [f"`{case.id}`", case.description, f"`{command}`", message.replace("|", "\\|")]
    return "| " + " | ".join(cells) + " |"


class _Capture:
    """Stands in for pytest's capsys when the page is written outside pytest."""

    def readouterr(self):
        err = sys.stderr.getvalue()
        sys.stderr.seek(0)
        sys.stderr.truncate()
        return type("Captured", (), {"err": err})


def write_doc() -> None:
    import io
    import logging

    logging.disable(logging.CRITICAL)
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            real_stderr, sys.stderr = sys.stderr, io.StringIO()
            try:
                _, message = run_case(case, tmp, _Capture())
            finally:
                sys.stderr = real_stderr
            rows.append(_row(case, shown(message, tmp)))
    header = (
        "# Bad input and what glo-search prints\n\n"
        "Each row is a case in `tests/test_bad_inputs.py`, with the last line that the "
        "command prints on\nstandard error (exit status 2). `<tmp>` stands for a scratch "
        "folder. None of these\ncommands leaves an experiment folder behind. Regenerate "
        "this page with\n`python tests/test_bad_inputs.py`.\n\n"
        "| case | bad input | command | message |\n| --- | --- | --- | --- |\n"
    )
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(header + "\n".join(rows) + "\n")
    print(f"wrote {len(rows)} cases to {DOC}")


if __name__ == "__main__":
    write_doc()
