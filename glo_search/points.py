"""Warm start: configurations that a sweep evaluates before the sampler proposes any.

A points file is a JSON or YAML list of mappings from search-space keys to values, such as
the reference setting of the model (class_dim 5, content_dim 25, noise_std 0.3,
content_decay 0). Each point is checked before Ray starts: its keys must be keys the space
varies, a categorical value must be one of the choices, and the point merged with the
sweep's fixed values must be a valid TrainConfig. A numeric value outside a range is
allowed (Optuna evaluates it and warns), so a reference setting outside the space can
still be compared.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution
from ray.tune.search.optuna import OptunaSearch

from glo_search.config import ConfigError, TrainConfig
from glo_search.spaces import DRY_RUN_SAMPLES, ResolvedSpace, config_keys

logger = logging.getLogger(__name__)


def read_points(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON or YAML list of configurations (YAML also reads JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"points file not found: {path}")
    try:
        if path.suffix == ".json":
            points = json.loads(path.read_text())
        else:
            points = yaml.safe_load(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"cannot parse points file {path}: {error.msg} at line {error.lineno}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"cannot parse points file {path}: not UTF-8 text; write it as JSON or YAML"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"cannot parse points file {path}: {problem}{where}") from None
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(
            f"points file {path} must contain a list of mappings from config key to value, "
            f"got {type(points).__name__}"
        )
    return points


def check_points(
    points: list[dict[str, Any]],
    space: ResolvedSpace,
    base: TrainConfig,
    num_samples: int,
    source: str = "points",
) -> list[dict[str, Any]]:
    """Validate warm-start points against a space and return them ready for OptunaSearch.

    For a define-by-run space a point may omit keys, which the sampler then fills in. The
    point gets the branch parameters (names starting with ``_``) under which the space
    reproduces its values, so that the sweep takes the same branch.

    Raises:
        ConfigError: naming the point (counted from 1), the key and the rule.
    """
    if len(points) > num_samples:
        raise ConfigError(
            f"{source} has {len(points)} configurations but --num-samples is "
            f"{num_samples}; raise --num-samples or drop points"
        )
    searcher_space = space.space
    if space.kind == "ray":
        searcher_space = OptunaSearch.convert_search_space(space.space)
    return [
        _check_point(index, point, space, searcher_space, base, source)
        for index, point in enumerate(points, start=1)
    ]


def _check_point(index, point, space, searcher_space, base, source) -> dict[str, Any]:
    where = f"point {index} in {source}"
    varied = space.keys if callable(searcher_space) else frozenset(searcher_space)
    valid = sorted(varied)
    for key in point:
        if key not in varied and not key.startswith("_"):
            raise ConfigError(
                f"{where} has key {key!r}, which search space {space.name!r} does not vary; "
                f"keys it varies: {', '.join(valid)}"
            )
    if not callable(searcher_space):
        missing = sorted(set(searcher_space) - set(point))
        if missing:
            raise ConfigError(
                f"{where} lacks {missing[0]!r}; a point for search space {space.name!r} "
                f"sets every key it varies: {', '.join(sorted(searcher_space))}"
            )
        _check_choices(where, point, space.name, searcher_space)
    _check_config(where, base, point)  # before Optuna, whose messages name no key
    values = _reproduce(where, point, space, searcher_space)
    _check_config(where, base, values)
    steering = {k: v for k, v in values.items() if k.startswith("_") and k not in point}
    return {**point, **steering}


def _check_config(where: str, base: TrainConfig, values: dict[str, Any]) -> None:
    try:
        base.replace(**config_keys(values))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _check_choices(where, point, space_name, searcher_space) -> None:
    for key, distribution in searcher_space.items():
        if isinstance(distribution, CategoricalDistribution):
            if not any(_same(point[key], choice) for choice in distribution.choices):
                choices = ", ".join(str(choice) for choice in distribution.choices)
                raise ConfigError(
                    f"{where} sets {key}={point[key]!r}, which is not a choice of search "
                    f"space {space_name!r}: {choices}"
                )


def _reproduce(where, point, space, searcher_space) -> dict[str, Any]:
    """Ask a throw-away study with the point enqueued until the space yields its values.

    A define-by-run space may reach a point's value only in some branches. For example,
    the default space yields content_decay 0 only as a constant, because its log-scale
    range rejects 0. So branches are sampled until one reproduces every value of the
    point, and one in which every parameter lies inside its distribution wins over one
    that reaches the value only as an out-of-range fixed value.
    """
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    fallback = None
    error = None
    values: dict[str, Any] = {}
    try:
        for _ in range(DRY_RUN_SAMPLES if callable(searcher_space) else 1):
            try:
                values, in_range = _ask_once(study, point, searcher_space)
            except ValueError as exc:  # a fixed value this branch's distribution rejects
                error = exc
                continue
            if all(_same(values.get(key), value) for key, value in point.items()):
                if in_range:
                    return values
                fallback = fallback or values
    finally:
        optuna.logging.set_verbosity(previous)
    if fallback is not None:
        return fallback
    if error is not None and not values:
        raise ConfigError(
            f"{where} has a value that search space {space.name!r} cannot take: {error}"
        )
    differing = next(k for k, v in point.items() if not _same(values.get(k), v))
    raise ConfigError(
        f"{where} sets {differing}={point[differing]!r}, but search space {space.name!r} "
        f"produced {differing}={values.get(differing)!r} in every branch tried; set the "
        "branch parameters (names starting with _) that select it"
    )


def _ask_once(study, point, searcher_space) -> tuple[dict[str, Any], bool]:
    study.enqueue_trial(point)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "out of range" for values outside a range
        if callable(searcher_space):
            trial = study.ask()
            constants = searcher_space(trial) or {}
        else:
            trial = study.ask(fixed_distributions=searcher_space)
            constants = {}
    in_range = all(
        distribution._contains(distribution.to_internal_repr(trial.params[name]))
        for name, distribution in trial.distributions.items()
    )
    return {**trial.params, **constants}, in_range


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return float(left) == float(right)
    return left == right
