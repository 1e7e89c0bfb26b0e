import re
import subprocess
import sys

import pandas as pd
import pytest

from glo_search.cli import build_parser, main
from glo_search.config import FIELDS


def _help(*command: str) -> str:
    parser = build_parser()
    if not command:
        return parser.format_help()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices[command[0]].format_help()


@pytest.mark.parametrize(
    "command", ["train", "sweep", "resume", "analyze", "probe", "study", "spaces", "classifier"]
)
def test_help_describes_every_option_with_default(command):
    import argparse

    options = [a for a in build_parser()._actions if a.dest == "command"][0].choices[command]
    for action in options._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            continue  # positional arguments have no default
        assert action.help, action.dest
        assert "default" in action.help or "(required)" in action.help, action.dest


def test_help_lists_hyperparameter_flags():
    text = _help("sweep")
    for flag in (
        "--space",
        "--num-samples",
        "--max-epochs",
        "--metric",
        "--max-concurrent",
        "--storage",
        "--seed",
        "--scheduler",
        "--gpus-per-trial",
        "--cpus-per-trial",
    ):
        assert flag in text
    train = _help("train")
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in train


def test_help_states_units():
    assert re.search(r"--max-epochs.*?unit: epochs", _help("sweep"), re.S)
    assert re.search(r"--batch-size.*?unit: images", _help("train"), re.S)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["sweep", "--class-dim", "0"], "invalid class_dim=0 (--class-dim): must be >= 1"),
        (["sweep", "--noise-std", "-1"], "invalid noise_std=-1.0 (--noise-std): must be >= 0"),
        (["sweep", "--loss", "l3"], "invalid loss='l3' (--loss): must be one of l1, l2, l1+l2"),
        (["sweep", "--space", "nope"], "unknown search space 'nope'; valid spaces: default"),
        (["train", "--content-dim", "0"], "invalid content_dim=0"),
    ],
)
def test_bad_value_one_line_error_before_ray(tmp_path, arguments, expected):
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "glo_search.cli",
            *arguments,
            *(["--storage", str(tmp_path)] if arguments[0] == "sweep" else []),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith(f"glo-search: error: {expected}")
    assert not list(tmp_path.iterdir())


def test_spaces_command_lists_spaces(capsys):
    assert main(["spaces"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("default")
    assert "report" in output


def test_train_command_writes_run(tmp_path, classifier_state):
    out = tmp_path / "run"
    code = main(
        [
            "-q",
            "train",
            "--epochs",
            "2",
            "--num-images",
            "100",
            "--swap-sources",
            "20",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert epochs["epoch"].tolist() == [1, 2]
    assert (out / "best.pt").is_file()
    assert (out / "last.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_train_warns_unused_perceptual_weights(tmp_path, classifier_state, caplog):
    weights = tmp_path / "vgg19.pth"  # never opened, because the loss is l1
    arguments = ["train", "--loss", "l1", "--perceptual-weights", str(weights)]
    arguments += ["--epochs", "1", "--num-images", "100", "--swap-sources", "20"]
    code = main([*arguments, "--out", str(tmp_path / "run")])
    assert code == 0
    assert "--perceptual-weights is ignored" in caplog.text
    assert "the loss is l1" in caplog.text


def test_sweep_command_prints_best_trials(ray_session, tmp_path, capsys):
    code = main(
        [
            "-q",
            "sweep",
            "--num-samples",
            "2",
            "--max-epochs",
            "1",
            "--num-images",
            "100",
            "--swap-sources",
            "20",
            "--storage",
            str(tmp_path),
            "--name",
            "cli",
        ]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "best 2 of 2 trials by disentanglement" in output
    assert f"experiment folder: {tmp_path / 'cli'}" in output
    assert "TERMINATED" not in output  # -q hides Tune's table of trial statuses
    assert (tmp_path / "cli" / "trials.parquet").is_file()


def test_unknown_option_shows_the_command_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["resume", "somewhere", "--num-samples", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: glo-search resume")
    assert "glo-search resume: error: unrecognized arguments: --num-samples 8" in err
