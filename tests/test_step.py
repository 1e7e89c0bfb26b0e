"""The hand-written training step and evaluation decoder against autograd on the modules."""

import copy
import math

import pytest
import torch

from glo_search import native
from glo_search.config import TrainConfig
from glo_search.model import GloGenerator, LatentCodes, build_generator
from glo_search.step import FusedAdamSteps, GloStep, decode, reconstruction_error, supported
from glo_search.trainer import Trainer

LOSSES = {
    "l1": torch.nn.functional.l1_loss,
    "l2": torch.nn.functional.mse_loss,
    "l1+l2": lambda a, b: (
        0.5 * torch.nn.functional.l1_loss(a, b) + 0.5 * torch.nn.functional.mse_loss(a, b)
    ),
}


def _model(class_dim=5, content_dim=7, images=40):
    torch.manual_seed(0)
    generator = GloGenerator(class_dim, content_dim).double().train()
    codes = LatentCodes(images, 10, content_dim, class_dim, torch.Generator().manual_seed(1))
    return generator, codes.double()


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize(("noise_std", "content_decay"), [(0.0, 0.0), (0.5, 0.1)])
def test_step_matches_autograd(loss, noise_std, content_decay):
    generator, codes = _model()
    hand_generator, hand_codes = copy.deepcopy(generator), copy.deepcopy(codes)
    indices = torch.tensor([3, 17, 0, 39, 8, 21, 30, 12, 5])
    labels = torch.tensor([1, 1, 4, 9, 0, 0, 7, 3, 1])
    images = torch.rand(len(indices), 1, 28, 28, dtype=torch.float64)
    noise = noise_std * torch.randn(len(indices), 7, dtype=torch.float64)

    content = codes.content[indices]
    output = generator(codes.classes[labels], content + noise)
    expected = LOSSES[loss](output, images) + content_decay * content.pow(2).sum(1).mean()
    expected.backward()
    got = GloStep(hand_generator, hand_codes, loss)(
        indices, labels, images, noise if noise_std else None, content_decay
    )

    torch.testing.assert_close(got, expected.detach())
    want = dict(generator.named_parameters()) | dict(codes.named_parameters())
    have = dict(hand_generator.named_parameters()) | dict(hand_codes.named_parameters())
    for name, parameter in want.items():
        torch.testing.assert_close(have[name].grad, parameter.grad, msg=f"gradient of {name}")
    for name, buffer in generator.named_buffers():
        torch.testing.assert_close(dict(hand_generator.named_buffers())[name], buffer, msg=name)


def test_decode_matches_generator_in_eval_mode():
    generator, codes = _model()
    generator.to_14[2].running_mean.uniform_(-1, 1)
    generator.to_14[2].running_var.uniform_(0.5, 2)
    generator.eval()
    class_code = codes.classes[torch.arange(10)]
    content_code = codes.content[:10]
    with torch.no_grad():
        expected = generator(class_code, content_code)
    torch.testing.assert_close(decode(generator, class_code, content_code), expected)


@pytest.mark.parametrize("native_kernels", [True, False])
@pytest.mark.parametrize("chunk", [None, 7, 32])
def test_reconstruction_error_matches_decoded_images(monkeypatch, native_kernels, chunk):
    if not native_kernels:
        monkeypatch.setattr(native, "kernels", lambda: None)
    elif native.kernels() is None:
        pytest.skip("the C kernels could not be built here")
    reference, codes = _model(images=40)
    reference.to_14[2].running_mean.uniform_(-1, 1)
    reference.to_14[2].running_var.uniform_(0.5, 2)
    reference.eval()
    class_code = codes.classes[torch.arange(40) % 10]
    targets = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = LOSSES["l1+l2"](reference(class_code, codes.content), targets.double())
    generator = copy.deepcopy(reference).float()
    got = reconstruction_error(
        generator, class_code.float(), codes.content.float(), targets, chunk
    )
    assert got == pytest.approx(expected.item(), rel=1e-6)


def test_reconstruction_error_rejects_unpaired_targets():
    generator, codes = _model(images=10)
    generator = generator.float().eval()
    class_code, content_code = codes.classes.float(), codes.content.float()
    with pytest.raises(
        ValueError, match=r"targets must be \(10, 1, 28, 28\).*got \(9, 1, 28, 28\)"
    ):
        reconstruction_error(generator, class_code, content_code, torch.rand(9, 1, 28, 28))


def test_reconstruction_error_of_no_codes_is_nan():
    generator, codes = _model()
    generator = generator.float().eval()
    empty = torch.zeros(0, 1, 28, 28)
    error = reconstruction_error(
        generator, codes.classes[:0].float(), codes.content[:0].float(), empty
    )
    assert math.isnan(error)


def test_codes_not_finite_decode_to_nan():
    generator, codes = _model(images=4)
    generator = generator.float().eval()
    class_code, content_code = codes.classes[:4].float(), codes.content.float()
    content_code[1, 0] = math.nan
    content_code[2, 0] = math.inf
    finite = torch.isfinite(decode(generator, class_code, content_code)).flatten(1).all(dim=1)
    assert finite.tolist() == [True, False, False, True]
    targets = torch.rand(4, 1, 28, 28)
    assert math.isnan(reconstruction_error(generator, class_code, content_code, targets))


def test_fused_adam_steps_equal_adam_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(4, 3), (5,), (2, 2)]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-3}, {"params": ps[2:], "lr": 1e-2}]  # noqa: E731
    adam = torch.optim.Adam(groups(params), fused=True)
    fast = torch.optim.Adam(groups(copies), fused=True)
    for p, q in zip(params, copies, strict=True):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    update = FusedAdamSteps(fast)
    for _ in range(5):
        for p, q in zip(params, copies, strict=True):
            grad = torch.randn_like(p)
            p.grad.copy_(grad)
            q.grad.copy_(grad)
        adam.step()
        update()
    for p, q in zip(params, copies, strict=True):
        assert torch.equal(p, q)
    assert fast.state_dict()["state"][0]["step"] == adam.state_dict()["state"][0]["step"] == 5


def test_hand_written_step_scope(small_dataset):
    def step_of(**changes):
        config = TrainConfig(num_images=200, swap_sources=50, **changes)
        return Trainer(config, small_dataset, device="cpu").step

    assert isinstance(step_of(), GloStep)
    assert step_of(generator="adain") is None
    assert not supported(build_generator("glo", 5, 5), "perceptual")


def test_hand_written_and_autograd_trainers_learn_alike(small_dataset):
    config = TrainConfig(num_images=200, swap_sources=50, noise_std=0.3, content_decay=0.01)
    hand = Trainer(config, small_dataset, device="cpu")
    plain = Trainer(config, small_dataset, device="cpu")
    plain.step = None
    for _ in range(2):
        assert hand.train_epoch() == pytest.approx(plain.train_epoch(), rel=1e-4)
    # Float rounding differs, and Adam amplifies it where a gradient is near zero, so the
    # codes agree on average rather than element by element.
    drift = (hand.codes.content - plain.codes.content).abs().mean()
    assert drift < 1e-2 * plain.codes.content.abs().mean()
    assert hand.evaluate()["recon_error"] == pytest.approx(
        plain.evaluate()["recon_error"], rel=1e-2
    )


def test_epoch_after_gradients_set_to_none(small_dataset):
    trainer = Trainer(TrainConfig(num_images=200, swap_sources=50), small_dataset, device="cpu")
    trainer.train_epoch()
    trainer.optimizer.zero_grad(set_to_none=True)
    before = trainer.codes.content.detach().clone()
    trainer.train_epoch()
    assert not torch.equal(trainer.codes.content, before)


def test_step_sums_gradients_of_repeated_indices():
    generator, codes = _model()
    hand_generator, hand_codes = copy.deepcopy(generator), copy.deepcopy(codes)
    indices, labels = torch.tensor([3, 3, 4]), torch.tensor([1, 2, 1])
    images = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    content = codes.content[indices]
    LOSSES["l1+l2"](generator(codes.classes[labels], content), images).backward()
    GloStep(hand_generator, hand_codes, "l1+l2")(indices, labels, images, None, 0.0)
    torch.testing.assert_close(hand_codes.content.grad, codes.content.grad)


def test_decode_of_no_codes_is_empty():
    generator, codes = _model()
    decoded = decode(generator.eval(), codes.classes[:0], codes.content[:0])
    assert decoded.shape == (0, 1, 28, 28)


def test_fused_adam_steps_unfused_group():
    parameter = torch.nn.Parameter(torch.zeros(3))
    unfused = torch.optim.Adam([parameter])
    fused = torch.optim.Adam([parameter], fused=True)
    fused.load_state_dict(unfused.state_dict())
    assert not FusedAdamSteps(fused).enabled
