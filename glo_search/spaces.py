"""Resolve a search space (a name, a define-by-run function or a dict) and validate it.

Validation runs before Ray starts: every key must be a TrainConfig field, and every
value a space can produce (the bounds of each range, every categorical choice, and a
sample of define-by-run draws) must pass the config's rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from ray.tune.search.sample import Categorical, Domain, Float, Integer

import search_spaces
from glo_search.config import FIELDS, ConfigError, TrainConfig, config_keys

logger = logging.getLogger(__name__)

DRY_RUN_SAMPLES = 64  # define-by-run draws checked, enough to visit each branch
UNSEARCHABLE = ("epochs",)  # the sweep's --max-epochs sets it, so ASHA's max_t matches


@dataclass(frozen=True)
class ResolvedSpace:
    """A validated search space in one of the three forms Ray Tune and Optuna accept."""

    name: str
    kind: str  # "define_by_run", "optuna" (dict of distributions) or "ray" (param_space)
    space: Any
    keys: frozenset[str]  # config keys the space sets


def resolve(space: str | dict | Callable, base: TrainConfig) -> ResolvedSpace:
    """Turn a name, file path, define-by-run function or dict into a ResolvedSpace."""
    name = "custom"
    if isinstance(space, str):
        try:
            named = search_spaces.load(space)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        name, space = named.name, named.space
    if callable(space):
        keys = _check_define_by_run(name, space, base)
        return ResolvedSpace(name, "define_by_run", space, keys)
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"search space {name!r} must be a non-empty dict or a define-by-run "
            f"function, got {type(space).__name__}"
        )
    _check_keys(name, space)
    if all(isinstance(v, BaseDistribution) for v in space.values()):
        for key, distribution in space.items():
            _check_values(name, base, key, _optuna_candidates(distribution))
        return ResolvedSpace(name, "optuna", space, frozenset(space))
    if any(isinstance(v, BaseDistribution) for v in space.values()):
        raise ConfigError(
            f"search space {name!r} mixes Optuna distributions with other values; "
            "use Optuna distributions for every key, or Ray Tune domains and constants"
        )
    for key, value in space.items():
        _check_values(name, base, key, _ray_candidates(value))
    return ResolvedSpace(name, "ray", space, frozenset(space))


def _check_keys(name: str, keys: Iterable[str]) -> None:
    for key in keys:
        if key.startswith("_"):
            continue
        if key not in FIELDS:
            raise ConfigError(
                f"search space {name!r} has unknown key {key!r}; valid keys: {', '.join(FIELDS)}"
            )
        if key in UNSEARCHABLE:
            raise ConfigError(
                f"search space {name!r} varies {key!r}, which the sweep sets "
                "(--max-epochs); remove it from the space"
            )


def _check_values(name: str, base: TrainConfig, key: str, values: Iterable[Any]) -> None:
    if key.startswith("_"):
        return
    for value in values:
        try:
            base.replace(**{key: value})
        except ConfigError as error:
            raise ConfigError(f"search space {name!r} can produce {error}") from None


def _optuna_candidates(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        return [distribution.low, distribution.high]
    return []


def _ray_candidates(value: Any) -> list[Any]:
    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, (Float, Integer)):
        upper = value.upper if isinstance(value, Float) else value.upper - 1
        return [value.lower, upper]
    if isinstance(value, Domain):
        return [value.sample() for _ in range(DRY_RUN_SAMPLES)]
    if isinstance(value, dict) and "grid_search" in value:
        return list(value["grid_search"])
    return [value]


def _check_define_by_run(name: str, function: Callable, base: TrainConfig) -> frozenset[str]:
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        keys: set[str] = set()
        checked: set[tuple[str, str]] = set()  # (key, repr of a distribution) seen so far
        for _ in range(DRY_RUN_SAMPLES):
            keys |= _dry_run_once(name, function, study.ask(), base, checked)
    finally:
        optuna.logging.set_verbosity(previous)
    return frozenset(k for k in keys if not k.startswith("_"))


def _dry_run_once(name, function, trial, base: TrainConfig, checked: set) -> set[str]:
    try:
        constants = function(trial)
    except Exception as error:  # a user's space may raise anything
        raise ConfigError(
            f"search space {name!r} raised {type(error).__name__}: {error}"
        ) from error
    if constants is not None and not isinstance(constants, dict):
        raise ConfigError(
            f"search space {name!r} returned {type(constants).__name__}; "
            "a define-by-run space returns None or a dict of constants"
        )
    values = {**trial.params, **(constants or {})}
    _check_keys(name, values)
    for key, distribution in trial.distributions.items():
        # Keyed by repr, because choices (1, 0.5) and (True, 0.5) compare equal but differ.
        seen = (key, repr(distribution))
        if seen not in checked:
            _check_values(name, base, key, _optuna_candidates(distribution))
            checked.add(seen)
    try:
        base.replace(**config_keys(values))
    except ConfigError as error:
        raise ConfigError(f"search space {name!r} can produce {error}") from None
    return set(values)
