"""GLO model: learned class and content codes and the generator that decodes them."""

from __future__ import annotations

import torch
from torch import nn

from glo_search.kernels import upsample_conv_transpose

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
        """Return the (batch, 16, 14, 14) activation maps (channels-last in memory)."""
        hidden = self.fc(torch.cat([class_code, content_code], dim=1))
        # Each upsampling and transposed-convolution pair runs as one fused, faster step.
        # to_14 and to_28 keep the parameters and are the reference that tests compare to.
        hidden = hidden.view(-1, ACTIVATION_CHANNELS, 5, 5).permute(0, 2, 3, 1)  # (B, 5, 5, 16)
        conv, norm, relu = self.to_14[1], self.to_14[2], self.to_14[3]
        maps = upsample_conv_transpose(hidden, conv.weight, conv.bias, conv.padding[0])
        return relu(norm(maps.permute(0, 3, 1, 2)))  # (B, 16, 14, 14)

    def forward(self, class_code: torch.Tensor, content_code: torch.Tensor):
        maps = self.activations(class_code, content_code).permute(0, 2, 3, 1)  # (B, 14, 14, 16)
        conv, sigmoid = self.to_28[1], self.to_28[2]
        out = upsample_conv_transpose(maps, conv.weight, conv.bias, conv.padding[0])
        return sigmoid(out.permute(0, 3, 1, 2))  # (B, 1, 28, 28)


class AdaptiveInstanceNorm(nn.Module):
    """Instance normalization whose per-channel scale and bias come from the class code.

    As in LORD (Gabbay & Hoshen, ICLR 2020), one linear layer per block maps the class
    code to the scale and bias, which replace the affine parameters of the norm.
    """

    def __init__(self, class_dim: int, channels: int) -> None:
        super().__init__()
        self.to_scale_bias = nn.Linear(class_dim, 2 * channels)

    def forward(self, x: torch.Tensor, class_code: torch.Tensor) -> torch.Tensor:
        scale, bias = self.to_scale_bias(class_code).chunk(2, dim=1)  # (B, C) each
        normalized = nn.functional.instance_norm(x, eps=1e-5)
        return normalized * scale[:, :, None, None] + bias[:, :, None, None]


class AdaInGenerator(nn.Module):
    """Decoder in which the class code enters only through adaptive instance norm.

    The content code alone goes through three fully connected layers to a 16x7x7 map.
    Two blocks of x2 nearest upsampling, 3x3 convolution, LeakyReLU and AdaIN(class
    code) give 16x14x14 and 16x28x28 maps, and a 5x5 convolution with a sigmoid makes
    the digit. The first block's output is the 14x14 map that matches the ``glo``
    generator's activation maps. LORD uses four blocks on 64x64 images; two fit 28x28.
    """

    def __init__(self, class_dim: int, content_dim: int) -> None:
        super().__init__()
        channels = ACTIVATION_CHANNELS
        self.fc = nn.Sequential(
            nn.Linear(content_dim, 84),
            nn.LeakyReLU(0.2),
            nn.Linear(84, 120),
            nn.LeakyReLU(0.2),
            nn.Linear(120, channels * 7 * 7),
            nn.LeakyReLU(0.2),
        )
        self.blocks = nn.ModuleList([_upsample_block(channels) for _ in range(2)])
        self.norms = nn.ModuleList([AdaptiveInstanceNorm(class_dim, channels) for _ in range(2)])
        self.to_image = nn.Sequential(nn.Conv2d(channels, 1, 5, padding=2), nn.Sigmoid())

    def _block(self, index: int, x: torch.Tensor, class_code: torch.Tensor) -> torch.Tensor:
        return self.norms[index](self.blocks[index](x), class_code)

    def activations(self, class_code: torch.Tensor, content_code: torch.Tensor):
        """Return the (batch, 16, 14, 14) output of the first AdaIN block."""
        hidden = self.fc(content_code).view(-1, ACTIVATION_CHANNELS, 7, 7)
        return self._block(0, hidden, class_code)

    def forward(self, class_code: torch.Tensor, content_code: torch.Tensor):
        x = self._block(1, self.activations(class_code, content_code), class_code)
        return self.to_image(x)  # (batch, 1, 28, 28)


def _upsample_block(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.LeakyReLU(0.2),
    )


GENERATORS = {"glo": GloGenerator, "adain": AdaInGenerator}


def build_generator(name: str, class_dim: int, content_dim: int) -> nn.Module:
    try:
        generator_class = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown generator {name!r}; valid: {', '.join(GENERATORS)}") from None
    return generator_class(class_dim, content_dim)


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
