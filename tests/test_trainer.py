import pytest
import torch
from plain_metrics import plain_classifier_logits, plain_style_attributes

from glo_search import classifier
from glo_search.config import TrainConfig
from glo_search.metrics import METRICS, recon_error, style_transfer
from glo_search.trainer import Trainer, read_checkpoint


def _config(**changes) -> TrainConfig:
    return TrainConfig(num_images=200, swap_sources=50, **changes)


def test_trainer_is_deterministic_on_cpu(small_dataset):
    first = Trainer(_config(), small_dataset, device="cpu")
    second = Trainer(_config(), small_dataset, device="cpu")
    assert first.train_epoch() == second.train_epoch()
    assert torch.equal(first.codes.content, second.codes.content)


def test_trainer_seed_changes_initialization(small_dataset):
    first = Trainer(_config(seed=0), small_dataset, device="cpu")
    second = Trainer(_config(seed=1), small_dataset, device="cpu")
    assert not torch.equal(first.codes.content, second.codes.content)


@pytest.mark.parametrize("loss", ["l1", "l2", "l1+l2"])
def test_training_lowers_recon_error(small_dataset, loss):
    trainer = Trainer(_config(loss=loss), small_dataset, device="cpu")
    before = trainer.evaluate()["recon_error"]
    for _ in range(3):
        trainer.train_epoch()
    assert trainer.evaluate()["recon_error"] < before


def test_evaluate_reports_every_metric(small_dataset, classifier_state):
    trainer = Trainer(_config(), small_dataset, classifier_state, device="cpu")
    trainer.train_epoch()
    results = trainer.evaluate()
    for name in METRICS:
        assert 0.0 <= results[name] <= 1.0, name
    assert results["disentanglement"] == pytest.approx(
        results["class_fidelity"] * results["style_transfer"]
    )
    assert all(results[f"nearest_{k}"] != k for k in range(10))


def test_evaluate_matches_plain_metrics(small_dataset, classifier_state):
    trainer = Trainer(_config(), small_dataset, classifier_state, device="cpu")
    for _ in range(2):
        trainer.train_epoch()
    results = trainer.evaluate()

    sources, targets = trainer.swaps.sources, trainer.swaps.targets
    codes = trainer.codes
    swaps = trainer.generate(codes.classes[targets], codes.content[sources])
    with torch.no_grad():
        logits = plain_classifier_logits(classifier.build(classifier_state), swaps)
    fidelity = (logits.argmax(1) == targets).double().mean().item()
    transfer = style_transfer(
        plain_style_attributes(small_dataset.images[sources]),
        plain_style_attributes(swaps),
        targets,
    )
    assert results["class_fidelity"] == fidelity
    assert results["style_transfer"] == pytest.approx(transfer, abs=1e-6)


@pytest.mark.parametrize("generator", ["glo", "adain"])
def test_evaluate_recon_error_of_reconstructions(small_dataset, generator):
    trainer = Trainer(_config(generator=generator), small_dataset, device="cpu")
    trainer.train_epoch()
    expected = recon_error(trainer.reconstruct(), small_dataset.images[:200])
    assert trainer.evaluate()["recon_error"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_without_classifier_reports_nan_fidelity(small_dataset):
    results = Trainer(_config(), small_dataset, device="cpu").evaluate()
    assert results["class_fidelity"] != results["class_fidelity"]


def test_evaluate_is_noise_free(small_dataset):
    trainer = Trainer(_config(noise_std=5.0), small_dataset, device="cpu")
    trainer.train_epoch()
    assert trainer.evaluate()["recon_error"] == trainer.evaluate()["recon_error"]


def test_content_decay_shrinks_content_codes(small_dataset):
    plain = Trainer(_config(lr_latent=0.05), small_dataset, device="cpu")
    decayed = Trainer(_config(lr_latent=0.05, content_decay=1.0), small_dataset, device="cpu")
    for _ in range(3):
        plain.train_epoch()
        decayed.train_epoch()
    plain_norm = plain.codes.content.norm(dim=1).mean()
    decayed_norm = decayed.codes.content.norm(dim=1).mean()
    assert decayed_norm < 0.5 * plain_norm


def test_save_load_continues_identically(tmp_path, small_dataset):
    trainer = Trainer(_config(), small_dataset, device="cpu")
    trainer.train_epoch()
    trainer.save(tmp_path / "trainer.pt", extra={"note": "epoch 1"})
    expected = trainer.train_epoch()

    restored = Trainer.load(tmp_path / "trainer.pt", small_dataset, device="cpu")
    assert restored.epoch == 1
    assert restored.train_epoch() == expected
    assert torch.equal(restored.codes.content, trainer.codes.content)


def test_checkpoint_holds_config_and_loads_weights_only(tmp_path, small_dataset):
    trainer = Trainer(_config(class_dim=7), small_dataset, device="cpu")
    trainer.save(tmp_path / "trainer.pt")
    state = read_checkpoint(tmp_path)
    assert state["config"]["class_dim"] == 7
    assert state["config"]["num_images"] == 200


class Payload:
    """A class that only full unpickling could rebuild, so weights_only loading rejects it."""


def test_checkpoint_with_pickled_object_is_rejected(tmp_path):
    import pickle

    torch.save({"config": {}, "object": Payload()}, tmp_path / "trainer.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(tmp_path / "trainer.pt")


def test_checkpoint_from_other_device_reseeds_noise(tmp_path, small_dataset, caplog):
    trainer = Trainer(_config(), small_dataset, device="cpu")
    trainer.train_epoch()
    state = trainer.state_dict()
    state["noise_rng"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state size
    restored = Trainer(_config(), small_dataset, device="cpu")
    restored.load_state_dict(state)
    assert restored.epoch == 1
    assert "reseeding" in caplog.text
    assert torch.isfinite(torch.tensor(restored.train_epoch()))
