"""Reconstruction losses and the loss-independent error used to compare runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glo_search.config import ConfigError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# VGG19 conv layers whose outputs the perceptual loss compares, as indices into
# torchvision's vgg19().features: the second conv of blocks 1-2 and the last conv of
# blocks 3-5 (conv1_2, conv2_2, conv3_4, conv4_4, conv5_4), the layers LORD uses.
VGG19_LAYERS = (2, 7, 16, 25, 34)
VGG_INPUT_SIZE = 64  # LORD's image size, at which block 5 still gets 4x4 maps
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Outputs of the reference digit classifier's two conv layers (32x26x26 and 64x11x11).
CLASSIFIER_LAYERS = (0, 3)


def l1_l2(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half mean absolute error plus half mean squared error."""
    return 0.5 * F.l1_loss(output, target) + 0.5 * F.mse_loss(output, target)


LOSSES: dict[str, Loss] = {
    "l1": F.l1_loss,
    "l2": F.mse_loss,
    "l1+l2": l1_l2,
}


class PerceptualLoss(nn.Module):
    """Pixel L1 plus, for each chosen layer of a frozen network, the mean absolute
    difference between the feature maps of output and target.

    The sum of pixel and feature terms follows the VGG distance of lord-pytorch
    (avivga/lord-pytorch, model/modules.py). Images are resized with bilinear
    interpolation, which is differentiable, and grey is repeated to 3 channels when the
    network expects colour.
    """

    def __init__(
        self,
        features: nn.Sequential,
        layers: Sequence[int],
        input_size: int = 28,
        channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        # Only the layers up to the deepest compared one are ever run.
        self.features = features[: max(layers) + 1].eval().requires_grad_(False)
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # an in-place ReLU would overwrite a kept conv output
        self.layers = frozenset(layers)
        self.input_size = input_size
        self.channels = channels
        self.register_buffer("mean", _channel_vector(mean, channels, 0.0))
        self.register_buffer("std", _channel_vector(std, channels, 1.0))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if self.channels != images.shape[1]:
            images = images.expand(-1, self.channels, -1, -1)  # (B, 3, H, W) grey as RGB
        return (images - self.mean) / self.std

    def _feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        x = self._prepare(images)
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.layers:
                maps.append(x)
        return maps

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(output, target)
        with torch.no_grad():
            target_maps = self._feature_maps(target)
        for output_map, target_map in zip(self._feature_maps(output), target_maps, strict=True):
            loss = loss + F.l1_loss(output_map, target_map)
        return loss


def _channel_vector(values: Sequence[float] | None, channels: int, fill: float) -> torch.Tensor:
    values = values if values is not None else [fill] * channels
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


def vgg19_perceptual_loss(weights_path: str | Path) -> PerceptualLoss:
    """PerceptualLoss on torchvision's VGG19 loaded from a local weights file (no download).

    The file is a state dict of the whole torchvision ``vgg19`` model (as shipped,
    e.g. ``vgg19-dcbb9e9d.pth``) or of its ``features`` part alone.
    """
    from torchvision.models import vgg19

    state = _read_weights(weights_path)
    features = vgg19(weights=None).features
    state = {
        key.removeprefix("features."): value
        for key, value in state.items()
        if not key.startswith("classifier.")
    }
    missing = sorted(set(features.state_dict()) - set(state))
    if missing:
        raise ConfigError(
            f"invalid perceptual_weights={str(weights_path)!r} (--perceptual-weights): not "
            f"a torchvision VGG19 state dict; {len(missing)} keys missing, e.g. "
            f"'features.{missing[0]}'"
        )
    try:
        features.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(
            f"invalid perceptual_weights={str(weights_path)!r} (--perceptual-weights): its "
            "keys or tensor shapes differ from torchvision's VGG19"
        ) from None
    return PerceptualLoss(features, VGG19_LAYERS, VGG_INPUT_SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)


def _read_weights(weights_path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"invalid perceptual_weights={str(weights_path)!r} (--perceptual-weights): "
            "file not found; give a local VGG19 weights file, or leave it empty to use "
            "the reference digit classifier"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on a file that is no state dict
        # Only torch's first sentence: the rest advises weights_only=False, which
        # would run code from the file.
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"invalid perceptual_weights={str(weights_path)!r} (--perceptual-weights): "
            f"cannot load it with torch.load ({type(error).__name__}: {reason}); expected "
            "a VGG19 state dict saved with torch.save"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"invalid perceptual_weights={str(weights_path)!r} (--perceptual-weights): "
            f"holds a {type(state).__name__}, expected a state dict"
        )
    return state


def classifier_perceptual_loss(classifier_state: dict[str, torch.Tensor]) -> PerceptualLoss:
    """PerceptualLoss on the reference digit classifier's conv layers (28x28 grey input)."""
    from glo_search import classifier

    return PerceptualLoss(classifier.build(classifier_state).features, CLASSIFIER_LAYERS)


def build_loss(
    name: str,
    classifier_state: dict[str, torch.Tensor] | None = None,
    perceptual_weights: str = "",
    device: torch.device | str = "cpu",
) -> Loss:
    """Return the loss function named ``name``.

    For ``perceptual`` the feature network is VGG19 from ``perceptual_weights`` when
    given, else the reference digit classifier (``classifier_state``, or the cached one).
    """
    if name == "perceptual":
        if perceptual_weights:
            return vgg19_perceptual_loss(perceptual_weights).to(device)
        if classifier_state is None:
            from glo_search import classifier

            classifier_state = classifier.load_state()
        return classifier_perceptual_loss(classifier_state).to(device)
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join([*LOSSES, "perceptual"])
        raise ValueError(f"unknown loss {name!r}; valid: {valid}") from None


# recon_error has one definition whatever loss a run trains with, so runs compare.
recon_error = l1_l2
