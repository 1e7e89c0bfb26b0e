from __future__ import annotations

import pytest
import torch

from glo_search.config import ConfigError, TrainConfig
from glo_search.losses import (
    PerceptualLoss,
    build_loss,
    classifier_perceptual_loss,
    vgg19_perceptual_loss,
)
from glo_search.metrics import recon_error
from glo_search.trainer import Trainer


@pytest.fixture(scope="module")
def digits(small_dataset):
    return small_dataset.images[:8]  # (8, 1, 28, 28)


@pytest.fixture(scope="module")
def classifier_loss(classifier_state):
    return classifier_perceptual_loss(classifier_state)


def test_perceptual_zero_for_identical_images(classifier_loss, digits):
    assert classifier_loss(digits, digits).item() == 0.0


def test_perceptual_above_pixel_l1(classifier_loss, digits):
    shuffled = digits.roll(1, dims=0)
    pixel_l1 = torch.nn.functional.l1_loss(shuffled, digits)
    assert classifier_loss(shuffled, digits).item() > pixel_l1.item()


def test_perceptual_gradient_reaches_output(classifier_loss, digits):
    output = torch.full_like(digits, 0.5, requires_grad=True)
    classifier_loss(output, digits).backward()
    assert output.grad.abs().sum() > 0


def test_perceptual_feature_network_frozen(classifier_loss):
    assert not any(p.requires_grad for p in classifier_loss.parameters())


def test_build_loss_perceptual_uses_classifier(classifier_state):
    loss = build_loss("perceptual", classifier_state)
    assert isinstance(loss, PerceptualLoss)
    assert loss.input_size == 28


def test_two_epochs_lower_recon_error(small_dataset, classifier_state):
    config = TrainConfig(num_images=200, swap_sources=20, loss="perceptual")
    trainer = Trainer(config, small_dataset, classifier_state, "cpu")
    before = recon_error(trainer.reconstruct(), trainer.images)
    for _ in range(2):
        trainer.train_epoch()
    assert recon_error(trainer.reconstruct(), trainer.images) < 0.95 * before


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """Randomly initialised VGG19 weights in torchvision's key layout (no download)."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg19().features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # classifier keys are ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(state, path)
    return path


def test_vgg_loss_on_grey_28px_digits(vgg_weights, digits):
    loss = vgg19_perceptual_loss(vgg_weights)
    assert loss.input_size == 64
    assert loss.channels == 3
    output = torch.full_like(digits[:2], 0.5, requires_grad=True)
    value = loss(output, digits[:2])
    value.backward()
    assert torch.isfinite(value)
    assert output.grad.abs().sum() > 0


def test_vgg_loss_through_config(vgg_weights):
    config = TrainConfig(loss="perceptual", perceptual_weights=str(vgg_weights))
    loss = build_loss(config.loss, None, config.perceptual_weights)
    assert loss.channels == 3


def test_vgg_weights_missing_file_rejected_by_config(tmp_path):
    with pytest.raises(ConfigError, match="perceptual_weights.*file not found"):
        TrainConfig(loss="perceptual", perceptual_weights=str(tmp_path / "absent.pth"))


def test_vgg_weights_missing_file_rejected_by_build_loss(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        build_loss("perceptual", None, str(tmp_path / "absent.pth"))


def test_vgg_weights_not_torch_file(tmp_path):
    path = tmp_path / "vgg19.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load it with torch.load"):
        vgg19_perceptual_loss(path)


def test_vgg_weights_not_a_state_dict(tmp_path):
    path = tmp_path / "vgg19.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match="expected a state dict"):
        vgg19_perceptual_loss(path)


def test_vgg_weights_wrong_keys(tmp_path):
    path = tmp_path / "vgg19.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="not a torchvision VGG19 state dict"):
        vgg19_perceptual_loss(path)


def test_vgg_weights_wrong_shapes(tmp_path):
    from torchvision.models import vgg19

    state = vgg19().features.state_dict()
    state["0.weight"] = torch.zeros(1)
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="tensor shapes differ"):
        vgg19_perceptual_loss(path)
