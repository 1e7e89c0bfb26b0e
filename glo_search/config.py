"""Typed training configuration shared by the trainer, the CLI, Tune and the results.

The field names of :class:`TrainConfig` are used everywhere a hyperparameter appears:
CLI flags (``class_dim`` becomes ``--class-dim``), keys of a search space, Parquet
columns and report labels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSSES = ("l1", "l2", "l1+l2", "perceptual")
GENERATORS = ("glo", "adain")
DATASETS = ("shipped", "mnist")
SPLITS = ("test", "train")


class ConfigError(ValueError):
    """A configuration or search-space value that breaks a rule; the message is one line."""


def _field(default: Any, help: str, unit: str = "") -> Any:
    return field(default=default, metadata={"help": help, "unit": unit})


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and settings of one GLO training run."""

    class_dim: int = _field(5, "size of each class code e_k")
    content_dim: int = _field(25, "size of each per-image content code c_i")
    noise_std: float = _field(
        0.3, "sigma: std of Gaussian noise added to content codes in training only"
    )
    content_decay: float = _field(
        0.0, "lambda: weight of mean_i ||c_i||^2 (clean codes) in the objective"
    )
    loss: str = _field("l1+l2", f"reconstruction loss, one of {', '.join(LOSSES)}")
    generator: str = _field("glo", f"generator, one of {', '.join(GENERATORS)}")
    perceptual_weights: str = _field(
        "",
        "torchvision VGG19 weights file (state dict) for loss 'perceptual'; empty: use "
        "the reference digit classifier as the feature network",
    )
    epochs: int = _field(50, "passes over the training images", "epochs")
    batch_size: int = _field(32, "images per optimizer step", "images")
    lr_generator: float = _field(1e-3, "Adam learning rate of the generator")
    lr_latent: float = _field(
        1e-2, "Adam learning rate of the class and content codes (LORD uses 10x)"
    )
    num_images: int = _field(2000, "training images: the first N of the split", "images")
    dataset: str = _field(
        "shipped",
        "'shipped': MNIST test split bundled with the package; "
        "'mnist': torchvision MNIST under --data-root",
    )
    data_root: str = _field("", "folder of torchvision's MNIST files (dataset 'mnist')")
    split: str = _field("test", "MNIST split for dataset 'mnist', test or train")
    download: bool = _field(False, "let torchvision download MNIST (needs a network)")
    seed: int = _field(0, "seed of code initialization, batch order and metric sampling")
    swap_sources: int = _field(
        150,
        "content images used for the cross-class swap metrics (all training images when "
        "--num-images is smaller)",
        "images",
    )
    eval_every: int = _field(
        1,
        "epochs between metric evaluations (in a sweep, each is a Ray Tune report); the "
        "last epoch and, in a sweep, the ASHA rung epochs are always evaluated",
        "epochs",
    )
    probe_every: int = _field(
        5,
        "epochs between probe and activation images in TensorBoard, written at evaluated "
        "epochs only (also at each new best epoch and the last); 0 writes none",
        "epochs",
    )

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        # Every field is declared bool, int, float or str, so a shallow copy is a full one.
        # dataclasses.asdict deep-copies each value, which took half of a space's dry run.
        return {name: getattr(self, name) for name in FIELDS}

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **changes})


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Hyperparameters a search space usually varies; every field of TrainConfig may be varied.
SEARCHED = ("class_dim", "content_dim", "noise_std", "content_decay")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Drop the underscore-prefixed parameters that only steer a define-by-run space."""
    return {k: v for k, v in params.items() if not k.startswith("_")}


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a config, rejecting unknown keys and values of the wrong type."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(FIELDS)}")
    converted = {name: _coerce(name, value) for name, value in values.items()}
    return TrainConfig(**converted)


def _coerce(name: str, value: Any) -> Any:
    """Convert numpy scalars and whole floats that searchers produce into the field type."""
    expected = FIELDS[name].type
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(name, value, "must be an integer")
        if isinstance(value, float) and not value.is_integer():
            raise _error(name, value, "must be an integer")
        return int(value)
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(name, value, "must be a number")
        return float(value)
    if expected == "bool":
        if not isinstance(value, bool):
            raise _error(name, value, "must be true or false")
        return value
    if not isinstance(value, str):
        raise _error(name, value, "must be a string")
    return value


def _error(name: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"invalid {name}={value!r} ({flag(name)}): {rule}")


def _check_min(config: TrainConfig, name: str, minimum: float, strict: bool = False):
    value = getattr(config, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise _error(name, value, "must be a finite number")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise _error(name, value, f"must be {relation} {minimum:g}")


def _check_choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise _error(name, value, f"must be one of {', '.join(choices)}")


def validate(config: TrainConfig) -> None:
    """Raise ConfigError naming the first field that breaks its rule."""
    for name in ("class_dim", "content_dim", "epochs", "batch_size"):
        _check_min(config, name, 1)
    _check_min(config, "num_images", 10)
    _check_min(config, "swap_sources", 10)
    _check_min(config, "probe_every", 0)
    _check_min(config, "eval_every", 1)
    _check_min(config, "seed", 0)
    if config.seed >= 2**32:
        raise _error("seed", config.seed, "must be below 2**32")
    _check_min(config, "noise_std", 0.0)
    _check_min(config, "content_decay", 0.0)
    _check_min(config, "lr_generator", 0.0, strict=True)
    _check_min(config, "lr_latent", 0.0, strict=True)
    _check_choice(config, "loss", LOSSES)
    _check_choice(config, "generator", GENERATORS)
    _check_choice(config, "dataset", DATASETS)
    _check_choice(config, "split", SPLITS)
    if config.dataset == "shipped" and config.split != "test":
        raise _error("split", config.split, "the shipped dataset has only the test split")
    if config.loss == "perceptual" and config.perceptual_weights:
        if not Path(config.perceptual_weights).expanduser().is_file():
            raise _error("perceptual_weights", config.perceptual_weights, "file not found")
    if config.dataset == "mnist" and not config.data_root:
        raise _error("data_root", config.data_root, "must name a folder when dataset is 'mnist'")
