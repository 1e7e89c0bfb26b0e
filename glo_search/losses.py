"""Reconstruction losses and the loss-independent error used to compare runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l1_l2(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half mean absolute error plus half mean squared error."""
    return 0.5 * F.l1_loss(output, target) + 0.5 * F.mse_loss(output, target)


LOSSES: dict[str, Loss] = {
    "l1": F.l1_loss,
    "l2": F.mse_loss,
    "l1+l2": l1_l2,
}


def build_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}") from None


# recon_error has one definition whatever loss a run trains with, so runs compare.
recon_error = l1_l2
