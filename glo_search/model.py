"""GLO model: learned class and content codes and the generator that decodes them."""

from __future__ import annotations

import torch
from torch import nn

# LORD (Gabbay & Hoshen, ICLR 2020) initializes latent codes uniformly in this range.
CODE_INIT_RANGE = 0.05
ACTIVATION_CHANNELS = 16  # channels of the 14x14 map people inspect


class GloGenerator(nn.Module):
    """Small decoder of [class code, content code] into a 28x28 digit.

    Three fully connected layers (input -> 84 -> 120 -> 16*5*5), then two stages of x2
    nearest upsampling and a transposed 5x5 convolution: 5x5 -> 14x14 (16 channels, batch
    norm, ReLU) -> 28x28 (1 channel, sigmoid).
    """

    def __init__(self, class_dim: int, content_dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(class_dim + content_dim, 84),
            nn.ReLU(),
            nn.Linear(84, 120),
            nn.ReLU(),
            nn.Linear(120, ACTIVATION_CHANNELS * 5 * 5),
            nn.ReLU(),
        )
        self.to_14 = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(ACTIVATION_CHANNELS, ACTIVATION_CHANNELS, 5),
            nn.BatchNorm2d(ACTIVATION_CHANNELS),
            nn.ReLU(),
        )
        self.to_28 = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(ACTIVATION_CHANNELS, 1, 5, padding=2),
            nn.Sigmoid(),
        )

    def activations(self, class_code: torch.Tensor, content_code: torch.Tensor):
        """Return the (batch, 16, 14, 14) activation maps."""
        hidden = self.fc(torch.cat([class_code, content_code], dim=1))
        return self.to_14(hidden.view(-1, ACTIVATION_CHANNELS, 5, 5))

    def forward(self, class_code: torch.Tensor, content_code: torch.Tensor):
        return self.to_28(self.activations(class_code, content_code))  # (batch, 1, 28, 28)


def build_generator(name: str, class_dim: int, content_dim: int) -> nn.Module:
    if name == "glo":
        return GloGenerator(class_dim, content_dim)
    raise ValueError(f"unknown generator {name!r}; valid: glo")


class LatentCodes(nn.Module):
    """One content code per training image and one class code per class (no encoder)."""

    def __init__(
        self,
        num_images: int,
        num_classes: int,
        content_dim: int,
        class_dim: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.content = nn.Parameter(_uniform_codes(num_images, content_dim, generator))
        self.classes = nn.Parameter(_uniform_codes(num_classes, class_dim, generator))


def _uniform_codes(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    codes = torch.rand(rows, dim, generator=generator)
    return (codes * 2 - 1) * CODE_INIT_RANGE
