"""Disentanglement metrics reported at each evaluated epoch.

The names in :data:`METRICS` are shared by the trainable, the scheduler, the searcher,
the Parquet files and the analysis. All metrics lie in [0, 1], so each has a finite
worst value that a diverged trial reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glo_search import lbfgs, native
from glo_search.losses import recon_error as recon_error_fn


@dataclass(frozen=True)
class MetricSpec:
    mode: str  # "max" or "min": the direction in which the metric improves
    description: str

    @property
    def worst(self) -> float:
        return 0.0 if self.mode == "max" else 1.0


METRICS: dict[str, MetricSpec] = {
    "recon_error": MetricSpec(
        "min", "1/2 mean absolute + 1/2 mean squared pixel error, clean codes"
    ),
    "ideal_neighbour_accuracy": MetricSpec(
        "max", "share of classes whose nearest class code is an ideal neighbour"
    ),
    "class_fidelity": MetricSpec(
        "max", "share of cross-class swaps the reference classifier labels as the class"
    ),
    "style_transfer": MetricSpec(
        "max", "correlation of style attributes between content source and swap output"
    ),
    "disentanglement": MetricSpec("max", "class_fidelity x style_transfer"),
    "content_leakage": MetricSpec(
        "min", "held-out accuracy of a logistic-regression label probe on content codes"
    ),
}

# Nearest digits by shape: for each digit, the digits its class code should sit closest to.
IDEAL_NEIGHBOURS: dict[int, tuple[int, ...]] = {
    0: (3, 8, 9),
    1: (4, 7),
    2: (3, 5, 8),
    3: (0, 8),
    4: (1, 7),
    5: (2, 3),
    6: (3, 8, 9),
    7: (1, 4),
    8: (0, 3),
    9: (3, 8),
}
STYLE_ATTRIBUTES = ("thickness", "slant", "width")
# Bound on 2 * height + width of the images that the C kernel style_sums takes: 16,384
# doubles, 128 KiB of a thread's stack. Larger images take the PyTorch path.
STYLE_KERNEL_MAX_SIDES = 16_384


def metric_mode(name: str) -> str:
    """Return "max" or "min" for a metric name, raising ValueError for unknown names."""
    try:
        return METRICS[name].mode
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}") from None


def nearest_classes(class_codes: torch.Tensor | np.ndarray) -> list[int]:
    """For each class code (row), return the index of its nearest other class code.

    Distances are Euclidean; ties go to the lower index.
    """
    codes = torch.as_tensor(class_codes, dtype=torch.float64)
    if codes.ndim != 2 or codes.shape[0] < 2:
        raise ValueError(f"class_codes must be (num_classes >= 2, dim), got {tuple(codes.shape)}")
    distances = torch.cdist(codes, codes)  # (K, K)
    distances.fill_diagonal_(float("inf"))
    return distances.argmin(dim=1).tolist()


def ideal_neighbour_accuracy(
    nearest: Sequence[int], ideal: Mapping[int, Sequence[int]] = IDEAL_NEIGHBOURS
) -> float:
    """Return the share of classes k whose nearest class, nearest[k], is in ideal[k].

    Classes missing from ``ideal`` are skipped; with none left the result is 0.
    """
    scored = [k for k in range(len(nearest)) if k in ideal]
    if not scored:
        return 0.0
    hits = sum(1 for k in scored if nearest[k] in ideal[k])
    return hits / len(scored)


def style_attributes(images: torch.Tensor) -> torch.Tensor:
    """Return (N, 3) style attributes of (N, 1, H, W) images: thickness, slant, width.

    Thickness is 2 * ink mass / ink perimeter, because a stroke of width w and length L
    has mass w*L and perimeter about 2L. The perimeter is the total gradient magnitude.
    Slant is mu11 / mu02 and width is sqrt(mu20), from the second-order central moments
    of the ink, in pixels.

    The moments come from row and column sums in float64. Where glo_search.native has
    built its kernels, one C kernel computes them and the perimeter in float64, for
    float32 images in CPU memory, and the attributes equal a float64 computation over all
    pixels to the last float32 bit. Otherwise PyTorch operations compute the gradient
    magnitude in float32 per pixel and sum it in float64. On shipped and generated digits,
    slant and width then equalled the float64 computation to the last float32 bit, and
    thickness differed from it by at most 1 unit in the last place.
    """
    x = images[:, 0]  # (N, H, W)
    sums = _native_style_sums(x)
    if sums is None:
        mass, mu20, mu02, mu11 = _ink_moments(x)
        perimeter = _ink_perimeter(x)
    else:
        mass = sums[:, 0].clamp_min(1e-8)
        mu20, mu02, mu11 = (sums[:, 1:4] / mass.view(-1, 1)).unbind(dim=1)
        perimeter = sums[:, 4]
    perimeter = perimeter.clamp_min(1e-8)
    thickness = 2 * mass / perimeter
    slant = mu11 / mu02.clamp_min(1e-8)
    return torch.stack([thickness, slant, mu20.sqrt()], dim=1).float()  # (N, 3)


def _native_style_sums(x: torch.Tensor) -> torch.Tensor | None:
    """Return (N, 5) float64 mass, unscaled mu20, mu02, mu11 and perimeter of (N, H, W)
    images from the C kernel style_sums, or None where it does not apply.

    On one core of a 2-core Intel Xeon VM, the style attributes of 1,350 images took
    2.1 ms this way against 4.6 ms in PyTorch operations.
    """
    count, height, width = x.shape
    # The kernel keeps 2 * height + width doubles per image on its thread's stack.
    small = 2 * height + width <= STYLE_KERNEL_MAX_SIDES
    if x.dtype != torch.float32 or x.device.type != "cpu" or count == 0 or not small:
        return None
    lib = native.kernels()
    if lib is None:
        return None
    sums = torch.empty(count, 5, dtype=torch.float64)
    lib.style_sums(x.contiguous(), sums, count, height, width)
    return sums


def _ink_moments(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return the ink mass and the central moments mu20, mu02, mu11 of (N, H, W) images.

    Each moment is a weighted sum of row or column sums. The sum over pixels of
    x * dx * dx is the sum over columns of colsum * dx^2. The sum of x * dx * dy is the
    sum over rows of dy times the row's sum of x * dx.
    """
    x = x.double()
    count, height, width = x.shape
    ys = torch.arange(height, dtype=x.dtype, device=x.device)
    xs = torch.arange(width, dtype=x.dtype, device=x.device)
    basis = torch.stack([torch.ones_like(xs), xs], dim=1)  # (W, 2)
    row_sums = (x.reshape(-1, width) @ basis).view(count, height, 2)
    rows = row_sums[..., 0]  # (N, H): ink per row
    row_moments = row_sums[..., 1]  # (N, H): ink times column index, per row
    columns = x.sum(dim=1)  # (N, W): ink per column
    mass = rows.sum(dim=1).clamp_min(1e-8)  # (N,)
    mean_x = (columns @ xs) / mass
    mean_y = (rows @ ys) / mass
    dx = xs - mean_x.view(-1, 1)  # (N, W)
    dy = ys - mean_y.view(-1, 1)  # (N, H)
    mu20 = (columns * dx * dx).sum(dim=1) / mass
    mu02 = (rows * dy * dy).sum(dim=1) / mass
    row_dx = row_moments - mean_x.view(-1, 1) * rows  # (N, H): sum of x * dx
    mu11 = (dy * row_dx).sum(dim=1) / mass
    return mass, mu20, mu02, mu11


def _ink_perimeter(x: torch.Tensor) -> torch.Tensor:
    """Return the (N,) sums of the forward-difference gradient magnitude, in float64.

    The image is padded with one zero row and column, so the last row and column count
    their drop to the background.
    """
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))  # (N, H + 1, W + 1)
    grad_x = padded[:, :-1, 1:] - padded[:, :-1, :-1]
    grad_y = padded[:, 1:, :-1] - padded[:, :-1, :-1]
    return torch.hypot(grad_x, grad_y).sum(dim=2).double().sum(dim=1)


@dataclass(frozen=True)
class Swaps:
    """Cross-class swaps: content of image sources[j] rendered as class targets[j]."""

    sources: torch.Tensor  # (M,) indices into the training images
    targets: torch.Tensor  # (M,) target classes, never the source's own label


def build_swaps(labels: torch.Tensor, num_sources: int, seed: int, num_classes: int = 10) -> Swaps:
    """Pair num_sources random images with every class other than their own label."""
    generator = torch.Generator().manual_seed(seed)
    count = min(num_sources, len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    sources, targets = [], []
    for target in range(num_classes):
        keep = chosen[labels[chosen] != target]
        sources.append(keep)
        targets.append(torch.full_like(keep, target))
    return Swaps(torch.cat(sources), torch.cat(targets))


def class_fidelity(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of swap outputs that the classifier labels as their target class."""
    if len(targets) == 0:
        return 0.0
    return (predicted.cpu() == targets.cpu()).double().mean().item()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    scale = torch.sqrt((a * a).sum() * (b * b).sum())
    if scale.item() < 1e-12:
        return 0.0
    return ((a * b).sum() / scale).item()


def style_transfer(
    source_attributes: torch.Tensor,
    output_attributes: torch.Tensor,
    targets: torch.Tensor,
) -> float:
    """Mean over attributes and target classes of the clipped source/output correlation.

    Within each target class the correlation runs over the swaps into that class. An
    output that ignores content has no variance, which counts as correlation 0.
    """
    scores = []
    targets = targets.cpu()
    for target in targets.unique().tolist():
        mask = targets == target
        if mask.sum() < 3:
            continue
        for j in range(source_attributes.shape[1]):
            r = _pearson(source_attributes[mask, j].cpu(), output_attributes[mask, j].cpu())
            scores.append(max(r, 0.0))
    return float(np.mean(scores)) if scores else 0.0


def content_leakage(content_codes: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Held-out accuracy of a logistic-regression probe predicting labels from content codes.

    Codes are standardized and split 80/20 at random (seeded); chance is about 0.1. The
    probe is scikit-learn's default ``LogisticRegression`` (multinomial, L2 penalty with
    C = 1, unpenalized intercept) on codes scaled as by ``StandardScaler`` and split as by
    ``train_test_split(test_size=0.2, random_state=seed)``. It is fitted by
    :mod:`glo_search.lbfgs`, with a written-out gradient that a C kernel computes where
    glo_search.native has built one. On 2,000 codes of 128 features from 20 epochs of
    training, and one core of a 2-core AMD EPYC VM, that took 0.15-0.18 s, against 0.35 s
    with PyTorch's L-BFGS and 0.46-0.48 s with scikit-learn. For codes of 4 to 128
    features after 1, 5 and 20 epochs (21 cases), the accuracies equaled those of
    PyTorch's L-BFGS and agreed with scikit-learn's to within 2 of the 400 held-out codes
    (``benchmarks/speed.py metrics`` checks the latter).
    """
    codes = content_codes.detach().double().cpu()
    y = labels.cpu()
    if not torch.isfinite(codes).all():
        return float("nan")
    train, test = probe_split(len(y), seed)
    mean = codes[train].mean(dim=0)
    scale = codes[train].std(dim=0, unbiased=False)
    # StandardScaler leaves features of (near) zero variance unscaled.
    tiny = 10 * torch.finfo(scale.dtype).eps
    scale = torch.where(scale < tiny, torch.ones_like(scale), scale)
    x = (codes - mean) / scale
    classes, y_index = torch.unique(y, return_inverse=True)
    weights = fit_logistic_regression(x[train], y_index[train], len(classes))
    logits = x[test] @ weights[:-1] + weights[-1]  # (test, classes)
    return (logits.argmax(dim=1) == y_index[test]).double().mean().item()


def probe_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train, test) indices as ``train_test_split(test_size=0.2, random_state=seed)``.

    scikit-learn draws one permutation from ``RandomState(seed)`` and takes its first
    ceil(0.2 * count) indices as the test split.
    """
    order = np.random.RandomState(seed).permutation(count)
    test_count = int(np.ceil(0.2 * count))
    return torch.from_numpy(order[test_count:]), torch.from_numpy(order[:test_count])


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    c: float = 1.0,
) -> torch.Tensor:
    """Fit multinomial logistic regression with L-BFGS; return (features + 1, classes) weights.

    The last row is the intercept. The objective is scikit-learn's: mean cross-entropy
    plus ||W||^2 / (2 C n), intercept unpenalized. The fit stops when no gradient entry
    exceeds 1e-5, ten times tighter than scikit-learn's default tolerance.
    """
    count, features = x.shape
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(
            f"invalid labels: {int(y.min())} to {int(y.max())}, expected class indices "
            f"in [0, {num_classes}); map them to indices first, as content_leakage does"
        )
    penalty = 1.0 / (2.0 * c * count)
    design = np.ascontiguousarray(  # (n, features + 1)
        np.concatenate([x.detach().cpu().double().numpy(), np.ones((count, 1))], axis=1)
    )
    labels = np.ascontiguousarray(y.detach().cpu().numpy().astype(np.int64))
    shape = (features + 1, num_classes)
    lib = native.kernels()
    if lib is not None and num_classes <= native.PROBE_MAX_CLASSES:
        objective = _native_objective(lib, design, labels, shape, penalty)
    else:
        objective = _numpy_objective(design, labels, shape, penalty)
    fit = lbfgs.minimize(objective, np.zeros(shape[0] * shape[1]), gradient_tolerance=1e-5)
    return torch.from_numpy(fit.x.reshape(shape)).to(x.dtype)


def _native_objective(lib, design: np.ndarray, labels: np.ndarray, shape, penalty: float):
    """Return the probe's objective, which computes its value and gradient by the C kernel
    logistic_objective.

    On one core of a 2-core AMD EPYC VM, one call took 0.9-1.3 ms for 1,600 codes of 128
    features, where PyTorch's operations took 2.8-3.7 ms. Products with 10 columns are
    too narrow for the matrix library to run at speed.
    """
    rows, columns = design.shape
    design_t, labels_t = torch.from_numpy(design), torch.from_numpy(labels)
    weights = torch.empty(shape, dtype=torch.float64)
    loss = torch.empty(1, dtype=torch.float64)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights.copy_(torch.from_numpy(w).view(shape))
        gradient = torch.empty(shape, dtype=torch.float64)
        lib.logistic_objective(
            design_t, weights, labels_t, gradient, loss, rows, columns, shape[1], penalty
        )
        return float(loss[0]), gradient.numpy().reshape(-1)

    return objective


def _numpy_objective(design: np.ndarray, labels: np.ndarray, shape, penalty: float):
    """Return the probe's objective in NumPy operations, for any number of classes."""
    rows = design.shape[0]
    onehot = np.zeros((rows, shape[1]))
    onehot[np.arange(rows), labels] = 1.0
    penalized = np.ones(shape)
    penalized[-1] = 0.0  # the intercept is not penalized

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights = w.reshape(shape)
        logits = design @ weights  # (n, classes)
        top = logits.max(axis=1, keepdims=True)
        log_z = top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        masked = weights * penalized
        loss = (log_z.sum() - (logits * onehot).sum()) / rows + penalty * (masked * masked).sum()
        residual = (np.exp(logits - log_z) - onehot) / rows
        gradient = design.T @ residual + 2.0 * penalty * masked
        return float(loss), gradient.reshape(-1)

    return objective


def recon_error(outputs: torch.Tensor, images: torch.Tensor) -> float:
    return recon_error_fn(outputs, images).item()
