"""Probe triplets and activation maps: the pictures that show what a GLO model learned.

A probe renders the content code of one training image with the class code of a target
class. Probes are chosen by criterion from the training images and the seed alone, so
every trial and epoch of an experiment (which share both) shows the same probes:

- ``reconstruction``: random images rendered with their own class;
- ``thick`` and ``thin``: the largest and smallest stroke thickness;
- ``slanted``: the largest absolute slant;

each of the last three rendered with a random class other than the image's label. A
probe is drawn as one row [class image | content image | output], 28 pixels each, where
the class image is the training digit nearest its class's mean image.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from glo_search.data import Dataset, DatasetCache
from glo_search.io import atomic_write
from glo_search.metrics import style_attributes

if TYPE_CHECKING:
    from glo_search.trainer import Trainer

CRITERIA = ("reconstruction", "thick", "thin", "slanted")
PROBES_PER_CRITERION = 3
ROW_GAP = 2  # pixels between probe rows
GROUP_GAP = 6  # pixels between the criteria's groups of rows
GAP_VALUE = 0.5  # grey, so gaps stand out from the black digit background
MAP_SCALE = 2  # each 14x14 activation map is drawn at 28x28
# The largest enlargement: 32 makes the triplet 2,688 x 896 pixels.
MAX_SCALE = 32
MAP_COLUMNS = 4


@dataclass(frozen=True)
class Probe:
    """Content of training image ``content_index`` rendered as class ``class_label``."""

    criterion: str
    content_index: int
    class_label: int
    class_index: int  # the training image drawn as the class's representative


@dataclass(frozen=True)
class ProbeSet:
    """Probes of one experiment, grouped by criterion in the order of ``CRITERIA``."""

    probes: tuple[Probe, ...]

    def __len__(self) -> int:
        return len(self.probes)

    def first_of_each(self) -> tuple[Probe, ...]:
        """Return the first probe of each criterion, whose activation maps are drawn."""
        firsts: dict[str, Probe] = {}
        for probe in self.probes:
            firsts.setdefault(probe.criterion, probe)
        return tuple(firsts.values())


def class_representatives(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10
) -> list[int]:
    """For each class, the index of the image nearest (Euclidean) its class's mean image.

    A class with no image gets -1.
    """
    flat = images.flatten(1).double()  # (N, 784)
    representatives = []
    for label in range(num_classes):
        members = (labels == label).nonzero().flatten()
        if len(members) == 0:
            representatives.append(-1)
            continue
        mean = flat[members].mean(dim=0, keepdim=True)
        distances = torch.cdist(flat[members], mean).flatten()
        representatives.append(int(members[distances.argmin()]))
    return representatives


def select_probes(
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    per_criterion: int = PROBES_PER_CRITERION,
    num_classes: int = 10,
) -> ProbeSet:
    """Choose the probe set of an experiment from its training images and seed.

    The result depends on nothing else, so trials that share images and seed get the
    same probes whatever their other hyperparameters.
    """
    images, labels = images.cpu(), labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    attributes = style_attributes(images)  # (N, 3): thickness, slant, width
    thickness, slant = attributes[:, 0], attributes[:, 1]
    count = min(per_criterion, len(labels))
    chosen = {
        "reconstruction": torch.randperm(len(labels), generator=generator)[:count],
        "thick": _top(thickness, count),
        "thin": _top(-thickness, count),
        # NOTE: slant is mu11 / mu02, which also grows for flat digits (small mu02), so
        # a wide, flat digit such as a long-barred 7 can rank among the slanted ones.
        "slanted": _top(slant.abs(), count),
    }
    representatives = class_representatives(images, labels, num_classes)
    probes = []
    for criterion in CRITERIA:
        for index in chosen[criterion].tolist():
            label = int(labels[index])
            if criterion == "reconstruction":
                target = label
            else:
                target = _other_class(label, num_classes, generator)
            probes.append(Probe(criterion, index, target, representatives[target]))
    return ProbeSet(tuple(probes))


# Probe sets by dataset object and seed. Choosing them took 13-14 ms per trial for 2,000
# digits on a 2-core AMD EPYC VM, 21-41 ms in a new process.
_PROBE_CACHE = DatasetCache()


def dataset_probes(dataset: Dataset, seed: int) -> ProbeSet:
    """Return :func:`select_probes` of a dataset's images and labels, computed once per
    dataset object and seed."""
    return _PROBE_CACHE.get(
        dataset,
        seed,
        lambda: select_probes(
            dataset.images, dataset.labels, seed, num_classes=dataset.num_classes
        ),
    )


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    # A stable sort keeps ties in image order, so the choice is reproducible.
    return torch.argsort(values, descending=True, stable=True)[:count]


def _other_class(label: int, num_classes: int, generator: torch.Generator) -> int:
    offset = int(torch.randint(1, num_classes, (1,), generator=generator))
    return (label + offset) % num_classes


@torch.no_grad()
def render_rows(trainer: Trainer, probes: tuple[Probe, ...]) -> torch.Tensor:
    """Return the (P, 1, 28, 84) rows [class image | content image | output] on the CPU."""
    class_labels = torch.tensor([p.class_label for p in probes], device=trainer.device)
    content_indices = torch.tensor([p.content_index for p in probes], device=trainer.device)
    outputs = trainer.generate(
        trainer.codes.classes[class_labels], trainer.codes.content[content_indices]
    ).cpu()
    images = trainer.dataset.images
    class_images = images[[p.class_index for p in probes]]
    content_images = images[[p.content_index for p in probes]]
    return torch.cat([class_images, content_images, outputs], dim=3)  # (P, 1, 28, 84)


def probe_grid(rows: torch.Tensor, criteria: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Stack probe rows (P, 1, 28, 84) into one (1, H, 84) image.

    Rows are ``ROW_GAP`` pixels apart, and ``GROUP_GAP`` apart where the criterion changes.
    """
    pieces = []
    for index, row in enumerate(rows):
        if index > 0:
            gap = GROUP_GAP if criteria[index] != criteria[index - 1] else ROW_GAP
            pieces.append(torch.full((1, gap, row.shape[-1]), GAP_VALUE))
        pieces.append(row)
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def activation_maps(trainer: Trainer, probe: Probe) -> torch.Tensor:
    """Return the generator's (16, 14, 14) activation maps for one probe (evaluation mode)."""
    generator = trainer.generator
    was_training = generator.training
    generator.eval()
    class_code = trainer.codes.classes[probe.class_label].unsqueeze(0)
    content_code = trainer.codes.content[probe.content_index].unsqueeze(0)
    maps = generator.activations(class_code, content_code)[0]
    generator.train(was_training)
    return maps.cpu()


def activation_grid(maps: torch.Tensor, columns: int = MAP_COLUMNS) -> torch.Tensor:
    """Tile (C, h, w) maps into one (1, H, W) image, scaled together to [0, 1].

    One scale for all maps keeps their strengths comparable: a channel that barely
    fires stays dark. Maps are enlarged ``MAP_SCALE`` times and ``ROW_GAP`` pixels apart.
    """
    low, high = maps.min(), maps.max()
    scaled = (maps - low) / (high - low).clamp_min(1e-8)
    scaled = scaled.repeat_interleave(MAP_SCALE, 1).repeat_interleave(MAP_SCALE, 2)
    channels, height, width = scaled.shape
    rows = -(-channels // columns)
    grid = torch.full(
        (1, rows * (height + ROW_GAP) - ROW_GAP, columns * (width + ROW_GAP) - ROW_GAP),
        GAP_VALUE,
    )
    for channel in range(channels):
        top = (channel // columns) * (height + ROW_GAP)
        left = (channel % columns) * (width + ROW_GAP)
        grid[0, top : top + height, left : left + width] = scaled[channel]
    return grid


def probe_images(trainer: Trainer, probe_set: ProbeSet) -> dict[str, torch.Tensor]:
    """Return every image of one probe snapshot, keyed by name, each (1, H, W) in [0, 1].

    ``grid`` contains every probe row, and ``activations_<criterion>`` the maps of the
    first probe of each criterion.
    """
    rows = render_rows(trainer, probe_set.probes)
    images = {"grid": probe_grid(rows, [p.criterion for p in probe_set.probes])}
    for probe in probe_set.first_of_each():
        images[f"activations_{probe.criterion}"] = activation_grid(activation_maps(trainer, probe))
    return images


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Write a (1, H, W) image in [0, 1] as an 8-bit grey PNG, enlarged ``scale`` times."""
    from PIL import Image

    pixels = image[0].clamp(0, 1).mul(255).round().to(torch.uint8)  # (H, W)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    picture = Image.fromarray(pixels.numpy())
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


class ProbeError(ValueError):
    """A probe request that cannot be drawn: a missing checkpoint or an index out of range."""


def checkpoint_file(path: str | Path) -> Path:
    """Return the checkpoint file at ``path``, or the one that the folder ``path`` names.

    A folder may be a Ray checkpoint folder (``trainer.pt``), the output folder of
    ``glo-search train`` (``best.pt``), a sweep's trial folder (its best checkpoint, as
    trials.parquet records it) or a sweep's experiment folder (the best checkpoint of
    its best trial by the sweep's metric).
    """
    from glo_search.results import TRIALS_FILE
    from glo_search.single import BEST_CHECKPOINT
    from glo_search.trainer import CHECKPOINT_FILE

    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ProbeError(f"checkpoint not found: {path}")
    for name in (CHECKPOINT_FILE, BEST_CHECKPOINT):
        if (path / name).is_file():
            return path / name
    if (path / TRIALS_FILE).is_file():
        return _recorded_checkpoint(path, None) / CHECKPOINT_FILE
    folder = path.resolve()  # "." or a link names a trial folder too
    if (folder.parent / TRIALS_FILE).is_file():
        return _recorded_checkpoint(folder.parent, folder.name) / CHECKPOINT_FILE
    raise ProbeError(
        f"no {CHECKPOINT_FILE} or {BEST_CHECKPOINT} in folder {path}; pass a checkpoint "
        "file, a checkpoint folder, or the folder of a train run, a sweep or a trial"
    )


def _recorded_checkpoint(experiment: Path, trial_dir: str | None) -> Path:
    """Return the best checkpoint folder of a trial, or of the sweep's best trial."""
    import json

    import pyarrow.parquet as pq

    from glo_search.metrics import METRICS
    from glo_search.results import TRIALS_FILE
    from glo_search.search import EXPERIMENT_FILE

    rows = pq.read_table(experiment / TRIALS_FILE).to_pylist()
    if trial_dir is not None:
        rows = [row for row in rows if row.get("trial_dir") == trial_dir]
        if not rows:
            raise ProbeError(f"{experiment / trial_dir} is not a trial of {experiment}")
        source = f"trial folder {experiment / trial_dir}"
    else:
        metric = json.loads((experiment / EXPERIMENT_FILE).read_text())["metric"]
        rows = [row for row in rows if row["status"] != "diverged"]
        rows = [row for row in rows if row.get(f"best_{metric}") is not None]
        rows.sort(key=lambda row: row[f"best_{metric}"], reverse=METRICS[metric].mode == "max")
        source = f"experiment folder {experiment}"
    rows = [row for row in rows if row.get("checkpoint_path")]
    if not rows:
        raise ProbeError(f"trials.parquet names no checkpoint for the {source}")
    folder = experiment / rows[0]["checkpoint_path"]
    if not folder.is_dir():
        raise ProbeError(
            f"the checkpoint that trials.parquet names for the {source}, {folder}, is missing"
        )
    return folder


def load_for_probes(path: str | Path, device: str = "cpu") -> Trainer:
    """Rebuild a trainer from a checkpoint with the weights that drawing needs.

    Only the generator and the latent codes are loaded: the optimizer and random states
    play no part in drawing. The loss becomes ``l1+l2`` so that a ``perceptual`` run does
    not load its feature network.
    """
    from glo_search.config import from_dict
    from glo_search.data import load_dataset
    from glo_search.trainer import Trainer, read_checkpoint

    file = checkpoint_file(path)
    try:
        state = read_checkpoint(file)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise ProbeError(
            f"cannot read checkpoint {file}: torch.load(weights_only=True) failed with "
            f"{type(error).__name__}; expected a trainer.pt, best.pt or last.pt written by "
            "glo-search"
        ) from None
    if not isinstance(state, dict):
        raise ProbeError(f"{file} is not a glo-search checkpoint: it holds no dict")
    missing = [key for key in ("config", "generator", "codes", "epoch") if key not in state]
    if missing:
        raise ProbeError(f"{file} is not a glo-search checkpoint: it lacks {', '.join(missing)}")
    config = from_dict({**state["config"], "loss": "l1+l2", "perceptual_weights": ""})
    trainer = Trainer(config, load_dataset(config), None, device)
    trainer.generator.load_state_dict(state["generator"])
    trainer.codes.load_state_dict(state["codes"])
    trainer.epoch = int(state["epoch"])
    return trainer


def write_probe(
    trainer: Trainer, class_label: int, content_index: int, out_dir: str | Path, scale: int = 4
) -> tuple[Path, Path]:
    """Write the triplet PNG of one probe and the PNG of its activation maps.

    Returns the two paths; both images are enlarged ``scale`` times.
    """
    dataset = trainer.dataset
    if not 1 <= scale <= MAX_SCALE:
        raise ProbeError(f"invalid scale {scale}: must be a whole number from 1 to {MAX_SCALE}")
    if not 0 <= class_label < dataset.num_classes:
        raise ProbeError(
            f"invalid class label {class_label}: must be in 0..{dataset.num_classes - 1}"
        )
    if not 0 <= content_index < len(dataset):
        raise ProbeError(
            f"invalid content index {content_index}: the checkpoint's model has "
            f"{len(dataset)} training images, so it must be in 0..{len(dataset) - 1}"
        )
    representative = class_representatives(dataset.images, dataset.labels)[class_label]
    probe = Probe("chosen", content_index, class_label, representative)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"class{class_label}_content{content_index}"
    triplet_path = out_dir / f"probe_{stem}.png"
    maps_path = out_dir / f"activations_{stem}.png"
    save_png(render_rows(trainer, (probe,))[0], triplet_path, scale)
    save_png(activation_grid(activation_maps(trainer, probe)), maps_path, scale)
    return triplet_path, maps_path
