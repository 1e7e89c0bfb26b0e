"""Shared fixtures: a small dataset, the cached digit classifier and one Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Cache the reference classifier inside the checkout, so a fresh clone trains it once
# (about 20 s on 2 cores) and later runs reuse it.
os.environ.setdefault(
    "GLO_SEARCH_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "glo-search")
)


@pytest.fixture(scope="session")
def classifier_state():
    from glo_search import classifier

    return classifier.load_state()


@pytest.fixture(scope="session")
def small_dataset():
    from glo_search.config import TrainConfig
    from glo_search.data import load_dataset

    return load_dataset(TrainConfig(num_images=200))


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for every test that sweeps; trials use at most 2 CPUs."""
    import ray

    from glo_search.search import ray_init_options

    ray.init(**ray_init_options(None, 2, None))  # as glo-search starts Ray
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_experiment(ray_session, tmp_path_factory):
    """A real sweep of 4 trials of at most 3 epochs on 200 images, moved after it ran.

    ASHA (grace period 1, reduction factor 2) usually stops some trials early. The folder
    is moved to another parent after the sweep, so tests see it as a copied experiment.
    """
    import shutil

    from glo_search.search import sweep

    storage = tmp_path_factory.mktemp("sweeps")
    sweep(
        "default",
        num_samples=4,
        max_epochs=3,
        base_config={"num_images": 200, "swap_sources": 100, "eval_every": 1},
        storage=storage,
        name="small",
        grace_period=1,
        reduction_factor=2,
        verbose=0,
    )
    moved = tmp_path_factory.mktemp("moved") / "small-copy"
    shutil.move(storage / "small", moved)
    return moved
