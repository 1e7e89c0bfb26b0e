"""Metrics written directly from their definitions, for tests that check faster code.

Style attributes run in float64 over all pixels, and the classifier applies ReLU before
max-pooling, as both were first written. Neither is tuned for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glo_search.classifier import DigitClassifier


def plain_style_attributes(images: torch.Tensor) -> torch.Tensor:
    """Return (N, 3) thickness, slant and width of (N, 1, H, W) images, in float64."""
    x = images[:, 0].double()  # (N, H, W)
    height, width = x.shape[1:]
    ys = torch.arange(height, dtype=x.dtype).view(1, -1, 1)
    xs = torch.arange(width, dtype=x.dtype).view(1, 1, -1)
    mass = x.sum(dim=(1, 2)).clamp_min(1e-8)  # (N,)
    dx = xs - ((x * xs).sum(dim=(1, 2)) / mass).view(-1, 1, 1)
    dy = ys - ((x * ys).sum(dim=(1, 2)) / mass).view(-1, 1, 1)
    mu20 = (x * dx * dx).sum(dim=(1, 2)) / mass
    mu02 = (x * dy * dy).sum(dim=(1, 2)) / mass
    mu11 = (x * dx * dy).sum(dim=(1, 2)) / mass
    padded = F.pad(x, (0, 1, 0, 1))
    grad_x = padded[:, :-1, 1:] - padded[:, :-1, :-1]
    grad_y = padded[:, 1:, :-1] - padded[:, :-1, :-1]
    perimeter = torch.sqrt(grad_x**2 + grad_y**2).sum(dim=(1, 2)).clamp_min(1e-8)
    thickness = 2 * mass / perimeter
    slant = mu11 / mu02.clamp_min(1e-8)
    return torch.stack([thickness, slant, mu20.sqrt()], dim=1).float()


def plain_classifier_logits(model: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Return (N, 10) logits with ReLU before max-pooling, all images in one contiguous batch."""
    conv1, conv2 = model.features[0], model.features[3]
    x = images.contiguous()
    x = F.max_pool2d(F.relu(F.conv2d(x, conv1.weight, conv1.bias)), 2)  # (N, 32, 13, 13)
    x = F.max_pool2d(F.relu(F.conv2d(x, conv2.weight, conv2.bias)), 2)  # (N, 64, 5, 5)
    hidden, output = model.head[1], model.head[3]
    x = F.relu(F.linear(x.flatten(1), hidden.weight, hidden.bias))
    return F.linear(x, output.weight, output.bias)
