from __future__ import annotations

import pytest
import torch

from glo_search.config import ConfigError, TrainConfig
from glo_search.metrics import recon_error
from glo_search.model import AdaInGenerator, build_generator
from glo_search.trainer import Trainer


@pytest.mark.parametrize("name", ["glo", "adain"])
def test_generator_shapes(name):
    generator = build_generator(name, class_dim=5, content_dim=25)
    class_code, content_code = torch.randn(3, 5), torch.randn(3, 25)
    assert generator(class_code, content_code).shape == (3, 1, 28, 28)
    assert generator.activations(class_code, content_code).shape == (3, 16, 14, 14)


def test_adain_output_depends_on_class_code():
    torch.manual_seed(0)
    generator = AdaInGenerator(class_dim=5, content_dim=25).eval()
    content_code = torch.randn(1, 25)
    first = generator(torch.randn(1, 5), content_code)
    second = generator(torch.randn(1, 5), content_code)
    assert not torch.allclose(first, second)


def test_adain_fc_reads_content_only():
    generator = AdaInGenerator(class_dim=5, content_dim=25)
    assert generator.fc[0].in_features == 25


def test_two_epochs_lower_recon_error(small_dataset, classifier_state):
    config = TrainConfig(num_images=200, swap_sources=20, generator="adain")
    trainer = Trainer(config, small_dataset, classifier_state, "cpu")
    before = recon_error(trainer.reconstruct(), trainer.images)
    for _ in range(2):
        trainer.train_epoch()
    assert recon_error(trainer.reconstruct(), trainer.images) < 0.95 * before


def test_unknown_generator_rejected():
    with pytest.raises(ConfigError, match="generator.*glo, adain"):
        TrainConfig(generator="vae")
