"""Find a trial's probe images (grids of [class | content | output] rows) near an epoch.

Two places are searched, in order, inside the trial folder:

1. PNG files under ``probes/`` (any depth) whose file name ends in the epoch number, such
   as ``probes/thick_epoch_0012.png``;
2. image summaries in the TensorBoard event files under ``tensorboard/``: the images the
   trainer writes at each new best epoch (tags ``best/...``) when there are any, else the
   periodic ones (tags containing "probe").

For each image name (file stem without the epoch, or TensorBoard tag) the image of the
epoch closest to the requested one is returned, the earlier one on a tie.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROBES_FOLDER = "probes"
TENSORBOARD_FOLDER = "tensorboard"
PROBE_TAG_WORD = "probe"
BEST_TAG_PREFIX = "best/"
_EPOCH_SUFFIX = re.compile(r"^(.*?)[_\-. ]*(?:epoch|step)?[_\-]?(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ProbeImage:
    """One encoded image of a trial, with where it was found."""

    name: str  # the file stem without its epoch, or the TensorBoard tag
    epoch: int
    png: bytes  # encoded image, PNG as written by TensorBoard or the trial
    source: str  # path of the file it came from, relative to the trial folder


def trial_folder(experiment_folder: Path, trial_id: str, trial_dir: str | None) -> Path:
    """Return a trial's folder inside the experiment folder, whatever path was stored.

    A stored absolute path may point to where the experiment was written before it was
    moved, so only its last part is used. ``trial_<id>`` is the fallback.
    """
    candidates = []
    if trial_dir:
        stored = Path(trial_dir)
        if not stored.is_absolute():
            candidates.append(experiment_folder / stored)
        candidates.append(experiment_folder / stored.name)
    candidates.append(experiment_folder / f"trial_{trial_id}")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[-1]


def _closest(epochs: list[int], epoch: int) -> int:
    return min(epochs, key=lambda e: (abs(e - epoch), e))


def _png_probes(folder: Path, epoch: int) -> list[ProbeImage]:
    found: dict[str, dict[int, Path]] = {}
    for path in sorted((folder / PROBES_FOLDER).rglob("*.png")):
        match = _EPOCH_SUFFIX.match(path.stem)
        if not match:
            continue
        name = str(path.relative_to(folder / PROBES_FOLDER).with_name(match.group(1) or "probe"))
        found.setdefault(name, {})[int(match.group(2))] = path
    images = []
    for name, by_epoch in found.items():
        chosen = _closest(list(by_epoch), epoch)
        path = by_epoch[chosen]
        images.append(ProbeImage(name, chosen, path.read_bytes(), str(path.relative_to(folder))))
    return images


def _tensorboard_probes(folder: Path, epoch: int) -> list[ProbeImage]:
    logs = folder / TENSORBOARD_FOLDER
    if not logs.is_dir():
        return []
    from tensorboard.backend.event_processing import event_accumulator

    images = []
    for run in sorted({path.parent for path in logs.rglob("events.out.tfevents.*")}):
        accumulator = event_accumulator.EventAccumulator(
            str(run), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 1}
        )
        accumulator.Reload()
        tags = accumulator.Tags().get(event_accumulator.IMAGES, [])
        best_tags = [tag for tag in tags if tag.startswith(BEST_TAG_PREFIX)]
        for tag in best_tags or [tag for tag in tags if PROBE_TAG_WORD in tag.lower()]:
            events = {event.step: event for event in accumulator.Images(tag)}
            chosen = _closest(list(events), epoch)
            images.append(
                ProbeImage(
                    tag,
                    chosen,
                    events[chosen].encoded_image_string,
                    str(run.relative_to(folder)),
                )
            )
    return images


def probe_images(folder: Path, epoch: int, max_images: int = 8) -> list[ProbeImage]:
    """Return up to ``max_images`` probe images of a trial folder near ``epoch``.

    Returns an empty list when the trial recorded none.
    """
    if not folder.is_dir():
        logger.warning("trial folder %s not found: no probe images", folder)
        return []
    images = _png_probes(folder, epoch) or _tensorboard_probes(folder, epoch)
    return sorted(images, key=lambda image: image.name)[:max_images]
