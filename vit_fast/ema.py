"""An exponential moving average (EMA) of a model's weights, kept on the model's device.

    ema = EMA(model, decay=0.9999)
    ...; optimizer.step(); ema.update()        # after every optimizer step
    evaluate(ema.model, ...)                   # a full model with the averaged weights

After each step every floating-point parameter and buffer w of the model moves its average to
decay * average + (1 - decay) * w, as two foreach kernels over all tensors (no host sync, no
Python loop over parameters, capturable in a CUDA graph). Other buffers (integer counters) are
copied as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


class EMA:
    """The averaged copy of ``model`` (``.model``, in eval mode, without gradients), updated from
    the live model's tensors by ``update``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(_tensors(self.model), _tensors(model), strict=True))
        self._avg = [a for a, _ in pairs if a.is_floating_point()]
        self._src = [w for a, w in pairs if a.is_floating_point()]
        self._copied = [(a, w) for a, w in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_mul_(self._avg, self.decay)
        torch._foreach_add_(self._avg, self._src, alpha=1.0 - self.decay)
        for avg, w in self._copied:
            avg.copy_(w)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
