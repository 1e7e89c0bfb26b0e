"""torch.optim's Adam without the first-call import of torch._dynamo.

PyTorch wraps Optimizer's add_param_group, state_dict, load_state_dict and zero_grad in
torch._disable_dynamo, and Adam.step in a wrapper that sets the grad mode and calls
torch._dynamo.graph_break(). Each wrapper imports torch._dynamo on its first call, so
the first optimizer of a process pays that import (sympy, torch.fx, torch._inductor):
1.0-1.5 s on a 2-core AMD EPYC VM with torch 2.14, once per Ray worker. The wrappers
only guard against torch.compile tracing into the optimizer, and this project never
compiles one. The class here calls the wrapped functions directly, so its updates and
state dicts are those of torch.optim.Adam, and checkpoints load into either.

NOTE: the wrapped functions are found through the ``__wrapped__`` attribute that
functools.wraps sets, checked with torch 2.14 only. Where a torch release drops it, a
method here falls back to the wrapped one, which works but imports torch._dynamo again.
The tests compare the updates with torch.optim's on CPU only, not on CUDA.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def _unwrapped(owner: type, name: str):
    return inspect.unwrap(getattr(owner, name))


_ADD_PARAM_GROUP = _unwrapped(torch.optim.Optimizer, "add_param_group")
_STATE_DICT = _unwrapped(torch.optim.Optimizer, "state_dict")
_LOAD_STATE_DICT = _unwrapped(torch.optim.Optimizer, "load_state_dict")
_ZERO_GRAD = _unwrapped(torch.optim.Optimizer, "zero_grad")
# Optimizer.__init__ wraps a class's step in a profiler hook, with functools.wraps, so
# unwrap follows that wrapper too and reaches the step that Adam's source defines.
_ADAM_STEP = _unwrapped(torch.optim.Adam, "step")


class _WithoutDynamoImport:
    """Optimizer methods that call torch.optim.Optimizer's functions without the wrapper."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def state_dict(self) -> dict[str, Any]:
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _LOAD_STATE_DICT(self, state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)


class Adam(_WithoutDynamoImport, torch.optim.Adam):
    """torch.optim.Adam that does not import torch._dynamo."""

    def step(self, closure=None):
        # The grad mode that torch.optim.Adam.step's wrapper sets around the update.
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return _ADAM_STEP(self, closure)
