"""The C kernels of the training step: their results, their build and the fallback."""

import copy
import logging

import pytest
import torch

from glo_search import native
from glo_search.config import TrainConfig
from glo_search.data import load_shipped
from glo_search.model import GloGenerator, LatentCodes
from glo_search.step import GloStep, decode
from glo_search.trainer import Trainer
from tests.test_step import LOSSES

if native._compiler() is None:
    pytest.skip("no C compiler here, so the C kernels cannot be built", allow_module_level=True)


def test_kernels_build_with_the_compiler_here():
    # With a compiler present, a failed build is a bug, not a reason to skip.
    assert native.kernels() is not None


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """Make kernels() look again, building into an empty cache folder."""
    monkeypatch.setenv("GLO_SEARCH_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    yield tmp_path
    native.kernels.cache_clear()


def _model(class_dim=5, content_dim=7, images=40, dtype=torch.float32):
    torch.manual_seed(0)
    generator = GloGenerator(class_dim, content_dim).to(dtype).train()
    codes = LatentCodes(images, 10, content_dim, class_dim, torch.Generator().manual_seed(1))
    return generator, codes.to(dtype)


def _assert_near(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float32 against a float64 reference: within 1e-4 of the reference's largest value."""
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= 1e-4 * scale + 1e-12, f"{name}: error {error:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("batch", [1, 9, 32])
def test_native_step_matches_autograd_in_float64(loss, batch):
    reference, codes = _model(dtype=torch.float64)
    generator, native_codes = _model()
    step = GloStep(generator, native_codes, loss)
    assert step.kernels is not None
    indices = torch.randperm(40, generator=torch.Generator().manual_seed(batch))[:batch]
    indices = indices.repeat(2)[:batch] if batch > 40 else indices
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    images = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    noise = 0.5 * torch.randn(batch, 7, generator=torch.Generator().manual_seed(4))

    content = codes.content[indices]
    output = reference(codes.classes[labels], content + noise.double())
    expected = LOSSES[loss](output, images.double()) + 0.1 * content.pow(2).sum(1).mean()
    expected.backward()
    got = step(indices, labels, images, noise, 0.1)

    _assert_near(got, expected.detach(), "loss")
    want = dict(reference.named_parameters()) | dict(codes.named_parameters())
    have = dict(generator.named_parameters()) | dict(native_codes.named_parameters())
    for name, parameter in want.items():
        if name == "to_14.1.bias":  # feeds batch norm, so its true gradient is zero
            assert have[name].grad.abs().max() < 1e-6
            continue
        _assert_near(have[name].grad, parameter.grad, f"gradient of {name}")
    buffers = dict(generator.named_buffers())
    for name, buffer in reference.named_buffers():
        if buffer.is_floating_point():
            _assert_near(buffers[name], buffer, name)
        else:
            assert buffers[name].item() == buffer.item(), name


def test_kernels_same_bits_any_thread_count():
    lib = native.kernels()
    generator = torch.Generator().manual_seed(0)
    batch = 7
    grad = torch.randn(batch, 14, 14, 16, generator=generator)
    maps = torch.randn(batch, 14, 14, 16, generator=generator)
    taps28 = torch.randn(36, batch * 14 * 14, generator=generator)
    targets = torch.rand(batch, 28, 28, generator=generator)
    weight, bias = torch.rand(2, 16, generator=generator)

    def run():
        out = {
            "maps": torch.empty(batch, 14, 14, 16),
            "normalized": torch.empty(batch, 14, 14, 16),
            "taps": torch.empty(batch * 25, 576),
            "bias_grad": torch.empty(16),
            "loss_grad": torch.empty(batch, 28, 28),
            "sums": torch.empty(2, dtype=torch.float64),
            "active": torch.empty_like(maps),
            "stats": torch.zeros(4, 16),
            "grad_maps": torch.empty_like(maps),
            "norm_grads": torch.empty(2, 16),
        }
        lib.stage_gather(grad, out["taps"], out["bias_grad"], batch, 5, 5, 16, 0)
        lib.stage_scatter(out["taps"], bias, out["maps"], None, None, batch, 5, 5, 16, 0)
        lib.stage_scatter(out["taps"], bias, out["normalized"], weight, bias, batch, 5, 5, 16, 0)
        lib.stage_loss(
            taps28, bias, targets, out["loss_grad"], out["sums"], batch, 14, 14, 2,
            0.5, 1.0, targets.numel(),
        )  # fmt: skip
        mean, invstd, running_mean, running_var = out["stats"]
        lib.norm_relu_forward(
            maps, weight, bias, running_mean, running_var, out["active"], mean, invstd,
            batch, 196, 16, 0.1, 1e-5,
        )  # fmt: skip
        lib.norm_relu_backward(
            grad, out["active"], maps, mean, invstd, weight, out["grad_maps"],
            *out["norm_grads"], batch, 196, 16,
        )  # fmt: skip
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run()
        torch.set_num_threads(2)
        two_threads = run()
    finally:
        torch.set_num_threads(threads)
    for name in one_thread:
        assert torch.equal(one_thread[name], two_threads[name]), name


def test_build_lands_in_the_cache_and_is_reused(fresh_build, caplog):
    caplog.set_level(logging.INFO, logger="glo_search.native")
    assert native.kernels() is not None
    builds = list((fresh_build / "native").glob("step_kernels-*.so"))
    assert len(builds) == 1
    assert "compiling" in caplog.text
    built_at = builds[0].stat().st_mtime_ns

    native.kernels.cache_clear()
    caplog.clear()
    assert native.kernels() is not None
    assert "compiling" not in caplog.text
    assert builds[0].stat().st_mtime_ns == built_at
    assert list((fresh_build / "native").iterdir()) == builds  # no temporary files left


def test_failed_build_falls_back_with_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.kernels() is None
    assert "could not build the training step's C kernels" in caplog.text
    assert "runs in PyTorch" in caplog.text
    assert not list((fresh_build / "native").glob("*.so"))

    generator, codes = _model()
    assert GloStep(generator, codes, "l1+l2").kernels is None


def test_missing_compiler_falls_back_with_a_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(fresh_build))  # no cc or gcc here
    assert native.kernels() is None
    assert "no C compiler found" in caplog.text


def test_switch_turns_the_kernels_off(fresh_build, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.kernels() is None


def test_trainers_with_and_without_kernels_learn_alike(small_dataset):
    config = TrainConfig(epochs=2, num_images=len(small_dataset), batch_size=16)
    with_kernels = Trainer(config, small_dataset, device="cpu")
    without = Trainer(config, small_dataset, device="cpu")
    without.step.kernels = None
    assert with_kernels.step.kernels is not None
    for _ in range(2):
        fast, plain = with_kernels.train_epoch(), without.train_epoch()
        assert fast == pytest.approx(plain, rel=1e-4)
    for name, parameter in with_kernels.generator.named_parameters():
        if name == "to_14.1.bias":  # its gradient is rounding noise, which Adam scales up
            continue
        other = dict(without.generator.named_parameters())[name]
        torch.testing.assert_close(parameter, other, rtol=1e-3, atol=1e-5, msg=name)


def test_float64_and_unsupported_models_keep_the_pytorch_step():
    generator, codes = _model(dtype=torch.float64)
    assert GloStep(generator, codes, "l1").kernels is None
    generator, codes = _model()
    assert GloStep(copy.deepcopy(generator), codes, "l1", use_native=False).kernels is None


def test_native_decode_matches_the_generator_in_float64():
    reference, codes = _model(dtype=torch.float64)
    reference.to_14[2].running_mean.uniform_(-1, 1)
    reference.to_14[2].running_var.uniform_(0.5, 2)
    reference.eval()
    generator = copy.deepcopy(reference).float()
    class_code, content_code = codes.classes[codes.classes.new_zeros(40).long()], codes.content
    expected = reference(class_code, content_code)
    got = decode(generator, class_code.float(), content_code.float())
    assert got.shape == expected.shape == (40, 1, 28, 28)
    _assert_near(got, expected, "decoded images")


def test_classifier_predictions_equal_the_module_path():
    from glo_search import classifier

    model = classifier.build(classifier.load_state())
    images, _ = load_shipped()
    images = torch.cat([images[:600], torch.rand(200, 1, 28, 28)])
    with torch.inference_mode():
        expected = model(images.contiguous(memory_format=torch.channels_last)).argmax(1)
        first_layer = model.features[2](model.features[1](model.features[0](images[:50])))
    assert classifier._native_forward(model, images) is not None
    assert torch.equal(classifier.predict(model, images), expected)
    pooled = torch.empty(50, 13, 13, 32)
    weight = model.features[0].weight.reshape(32, 9).t().contiguous()
    native.kernels().conv_pool_relu(
        images[:50].contiguous(), weight, model.features[0].bias, pooled, 50, 28, 28, 13, 13
    )
    _assert_near(pooled.permute(0, 3, 1, 2), first_layer.double(), "first layer")
