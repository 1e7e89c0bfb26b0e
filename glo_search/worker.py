"""Preparation of a Ray worker started by glo-search, before its first trial.

Ray imports this module in every worker process it starts for a local glo-search Ray
(see glo_search.warm). The import brings in torch, Ray Tune and the trainer, then fills
the worker's caches for the default training digits: the digits themselves, the
cross-class swaps that the metrics use and the probe rows of TensorBoard's images. A
trial on the default digits then finds them at hand. Without the digits and swaps, the
first trial of each warm worker in a sweep on a 2-core Intel Xeon VM spent 0.13-0.15 s
setting up, against 0.01 s for the later trials.
"""

from __future__ import annotations

import logging
import os

from glo_search.trainable import prepare_worker

logger = logging.getLogger(__name__)

try:
    prepare_worker()
except Exception as error:  # noqa: BLE001 - a trial reports its own data errors later
    logger.debug(
        "preparing worker process %d for the default digits failed: %s; each trial loads "
        "its own digits",
        os.getpid(),
        error,
    )
