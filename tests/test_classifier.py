import pytest
import torch
import torch.nn.functional as F
from plain_metrics import plain_classifier_logits

from glo_search import classifier
from glo_search.config import TrainConfig
from glo_search.trainer import Trainer


@pytest.fixture(scope="module")
def digits_and_swaps(small_dataset):
    """The 200 dataset digits and 450 swaps decoded by a generator trained one epoch."""
    trainer = Trainer(TrainConfig(num_images=200, swap_sources=50), small_dataset, device="cpu")
    trainer.train_epoch()
    codes = trainer.codes
    swaps = trainer.generate(
        codes.classes[trainer.swaps.targets], codes.content[trainer.swaps.sources]
    )  # (450, 1, 28, 28)
    return torch.cat([small_dataset.images, swaps])


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("batch_size", [7, 64, 4096])
def test_predict_matches_plain_forward(
    classifier_state, digits_and_swaps, channels_last, batch_size
):
    model = classifier.build(classifier_state)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain_classifier_logits(model, digits_and_swaps).argmax(1)
    predicted = classifier.predict(model, digits_and_swaps, batch_size)
    assert predicted.shape == expected.shape
    assert torch.equal(predicted, expected)


def test_classifier_logits_match_plain_forward(classifier_state, digits_and_swaps):
    model = classifier.build(classifier_state)
    with torch.no_grad():
        logits = model(digits_and_swaps)
        expected = plain_classifier_logits(model, digits_and_swaps)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_classifier_gradients_match_plain_forward(classifier_state, digits_and_swaps):
    # Training runs the same module, so pooling before ReLU must not change gradients.
    model = classifier.build(classifier_state).requires_grad_(True)
    images = digits_and_swaps[:128]
    labels = torch.arange(len(images)) % 10
    F.cross_entropy(model(images), labels).backward()
    gradients = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(plain_classifier_logits(model, images), labels).backward()
    for (name, parameter), gradient in zip(model.named_parameters(), gradients, strict=True):
        torch.testing.assert_close(gradient, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_moved_cache_reports_its_weights(classifier_state, tmp_path):
    # After a move of the cache (and GLO_SEARCH_CACHE set to it), the info names the new file.
    weights, info = classifier._paths(classifier.cache_dir())
    for path in (weights, info):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert classifier.load_info(tmp_path).weights == str(tmp_path / weights.name)
