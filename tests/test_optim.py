"""glo_search.optim: torch.optim's Adam without importing torch._dynamo."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from processes import child_env

from glo_search import optim
from glo_search.step import FusedAdamSteps


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (2, 2)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    # Two groups with their own rates, as the trainer's generator and latent codes.
    return [{"params": params[:2], "lr": 1e-3}, {"params": params[2:], "lr": 1e-2}]


def _copy(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _step_both(pairs, steps: int, seed: int = 1) -> None:
    """Give each optimizer of ``pairs`` the same random gradients and step it."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = None
        for params, optimizer in pairs:
            if grads is None:
                grads = [torch.randn(p.shape, generator=generator) for p in params]
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            optimizer.step()


@pytest.mark.parametrize("options", [{"fused": True}, {"fused": False}, {"weight_decay": 0.1}])
def test_adam_updates_equal_torch_adam(options):
    ours_params = _params()
    torch_params = _copy(ours_params)
    ours = optim.Adam(_groups(ours_params), **options)
    reference = torch.optim.Adam(_groups(torch_params), **options)
    _step_both([(ours_params, ours), (torch_params, reference)], steps=6)
    for p, q in zip(ours_params, torch_params, strict=True):
        assert torch.equal(p, q)


def test_fused_adam_steps_accept_adam():
    ours_params = _params()
    torch_params = _copy(ours_params)
    ours = optim.Adam(_groups(ours_params), fused=True)
    reference = torch.optim.Adam(_groups(torch_params), fused=True)
    for p in ours_params:
        p.grad = torch.zeros_like(p)
    update = FusedAdamSteps(ours)
    assert update.enabled
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        for p, q in zip(ours_params, torch_params, strict=True):
            grad = torch.randn(p.shape, generator=generator)
            p.grad.copy_(grad)
            q.grad = grad.clone()
        update()
        reference.step()
    for p, q in zip(ours_params, torch_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("direction", ["ours to torch", "torch to ours"])
def test_adam_state_dict_loads_both_ways(direction):
    """A checkpoint of either optimizer continues in the other with the same updates."""
    make = {"ours": optim.Adam, "torch": torch.optim.Adam}
    source_name, target_name = direction.split(" to ")
    source_params = _params()
    source = make[source_name](_groups(source_params), fused=True)
    _step_both([(source_params, source)], steps=3)
    buffer = io.BytesIO()  # through a file, as a checkpoint, so no tensor is shared
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    target_params = _copy(source_params)
    target = make[target_name](_groups(target_params), fused=True)
    target.load_state_dict(state)
    assert target.state_dict()["state"][0]["step"] == 3
    _step_both([(source_params, source), (target_params, target)], steps=3, seed=3)
    for p, q in zip(source_params, target_params, strict=True):
        assert torch.equal(p, q)
    assert target.state_dict()["param_groups"] == source.state_dict()["param_groups"]


def test_adam_zero_grad_clears_gradients():
    params = _params()
    optimizer = optim.Adam(_groups(params))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


def test_trainer_does_not_import_dynamo(tmp_path):
    """A trainer's setup, epoch, metrics, checkpoint and restore leave torch._dynamo out.

    Importing it took 1.0-1.5 s, once in every Ray worker, so a fresh process checks it.
    """
    script = textwrap.dedent(
        f"""
        import sys

        from glo_search.config import TrainConfig
        from glo_search.data import load_dataset
        from glo_search.trainer import Trainer

        config = TrainConfig(num_images=200, swap_sources=50, epochs=2)
        dataset = load_dataset(config)
        trainer = Trainer(config, dataset, device="cpu")
        trainer.train_epoch()
        trainer.evaluate()
        trainer.save({str(tmp_path / "trainer.pt")!r})
        restored = Trainer.load({str(tmp_path / "trainer.pt")!r}, dataset, device="cpu")
        restored.train_epoch()
        print("torch._dynamo" in sys.modules)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
