"""Named search spaces over TrainConfig fields.

Each module in this package is one space: it defines ``SPACE`` and a one-line
``DESCRIPTION``. ``SPACE`` is either an Optuna define-by-run function (it calls
``trial.suggest_*`` and may return a dict of constants) or a dict mapping config keys to
Optuna distributions, Ray Tune domains or constants. Parameter names that start with an
underscore steer a define-by-run space (for example a branch switch) and are not passed
to the trainer.

A space can also be loaded from a Python file that defines ``SPACE``:
``glo-search sweep --space path/to/my_space.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NamedSpace:
    name: str
    description: str
    space: Any  # define-by-run callable or dict


def names() -> list[str]:
    return sorted(
        info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
    )


def _from_module(name: str, module: Any) -> NamedSpace:
    if not hasattr(module, "SPACE"):
        raise ValueError(f"search space {name!r} ({module.__file__}) defines no SPACE")
    return NamedSpace(name, getattr(module, "DESCRIPTION", ""), module.SPACE)


def load(name_or_path: str) -> NamedSpace:
    """Return a space by name from this package, or from a .py file defining SPACE."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"search space file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"glo_space_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # a user's file may raise anything, SyntaxError included
            raise ValueError(
                f"search space file {path} failed to load: {type(error).__name__}: {error}"
            ) from error
        return _from_module(path.stem, module)
    if name_or_path not in names():
        raise ValueError(
            f"unknown search space {name_or_path!r}; valid spaces: {', '.join(names())} "
            "(or a path to a .py file that defines SPACE)"
        )
    return _from_module(name_or_path, importlib.import_module(f"{__name__}.{name_or_path}"))
