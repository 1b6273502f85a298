"""The optimizer side of a training step, kept on the device so a step reads nothing back.

AdamW (fused; capturable on CUDA) whose learning rate is one device tensor shared by every
parameter group; the warm-up + cosine schedule as a device-side table lookup (``LRSchedule``);
checkpointing that restores optimizer state in place (a captured CUDA graph holds its tensors);
and ``NonFiniteWatch``, the device flag of the first step whose loss was not finite. Used by
``vit_fast.train`` and by the cost account, which builds the same optimizer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorm parameters, the class token and positional embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step ``s``: linear warm-up, then cosine to min_ratio."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def optimizer_options(device: torch.device) -> dict:
    """How AdamW is built for ``device`` (see make_optimizer)."""
    return {"fused": True, "capturable": device.type == "cuda"}


def lr_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the lr tensor: CUDA's fused AdamW reads a float32 lr; the CPU's reads a double,
    which keeps a CPU run's updates bit-identical to AdamW with a Python-float lr."""
    return torch.float32 if device.type == "cuda" else torch.float64


def make_optimizer(groups: list[dict], lr: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` whose learning rate is one 0-dim tensor on ``device`` (``lr_dtype``),
    shared by every group (``LRSchedule`` writes it), and whose step counters live on the device too.

    ``fused=True`` runs the update as a few multi-tensor kernels and takes the lr tensor without
    reading it back; on CUDA ``capturable=True`` as well, which keeps the bias corrections on the
    device and is what CUDA-graph capture of ``step()`` checks for."""
    lr_t = torch.tensor(lr, dtype=lr_dtype(device), device=device)
    for g in groups:
        g["lr"] = lr_t
    return torch.optim.AdamW(groups, lr=lr_t, betas=betas, **optimizer_options(device))


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpointed optimizer state into ``optimizer``, in place where it already has state.

    ``Optimizer.load_state_dict`` takes each group's settings from the checkpoint and makes new
    state tensors. The settings this run's optimizer was built with (the shared lr tensor, fused,
    capturable) are put back, the lr tensor receiving the saved value; the step counters go where
    the moments are (a checkpoint written on the CPU may be resumed on a GPU); and state tensors the
    optimizer already had (a CUDA graph may hold them) receive the saved values instead of being
    replaced."""
    built = [{k: g[k] for k in ("lr", "fused", "capturable")} for g in optimizer.param_groups]
    live = {p: dict(s) for p, s in optimizer.state.items()}
    optimizer.load_state_dict(state)
    for group, mine in zip(optimizer.param_groups, built):
        saved_lr = group["lr"]
        group.update(mine)
        mine["lr"].copy_(torch.as_tensor(saved_lr, dtype=mine["lr"].dtype))
    for p, p_state in optimizer.state.items():
        if "step" in p_state and "exp_avg" in p_state:
            p_state["step"] = p_state["step"].to(p_state["exp_avg"].device, torch.float32)
        for key, tensor in live.get(p, {}).items():
            if isinstance(tensor, Tensor) and isinstance(p_state.get(key), Tensor):
                p_state[key] = tensor.copy_(p_state[key])


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with each group's lr as a float (a checkpoint independent of the device)."""
    state = optimizer.state_dict()
    state["param_groups"] = [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]
    return state


class LRSchedule:
    """The learning rate of every optimizer step, kept on the device: ``warmup_cosine``'s values.

    ``lr`` is the optimizer's lr tensor; ``steps`` (int64, 0-dim, on the device) counts the steps
    taken. ``step()`` advances the counter and writes the next step's rate into ``lr``, as torch
    ops (a lookup into the table of every step's rate, computed once by ``warmup_cosine`` itself so
    the values are the formula's exactly), so a step reads nothing back and is capturable in a
    CUDA graph. Past the last step the rate stays at the last step's value (the formula's min)."""

    def __init__(self, lr: Tensor, peak_lr: float, factor: Callable[[int], float], total_steps: int) -> None:
        self.lr, self.total_steps = lr, total_steps
        rates = [peak_lr * factor(s) for s in range(total_steps + 1)]
        self.table = torch.tensor(rates, dtype=lr.dtype).to(lr.device)  # (total_steps + 1,)
        self.steps = torch.zeros((), dtype=torch.int64, device=lr.device)
        self._write()

    def _write(self) -> None:
        at = self.steps.clamp(max=self.total_steps).view(1)
        self.lr.copy_(self.table.index_select(0, at).view(()))

    def step(self) -> None:
        self.steps.add_(1)
        self._write()

    def state_dict(self) -> dict:
        return {"steps": int(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        # "last_epoch": a torch LambdaLR's state, as checkpoints from before this schedule hold it.
        self.steps.fill_(state["steps"] if "steps" in state else state["last_epoch"])
        self._write()


NO_BAD_STEP = torch.iinfo(torch.int64).max  # NonFiniteWatch.first_bad while every loss was finite


class NonFiniteWatch:
    """Remembers on the device the first optimizer step (0-based) whose loss was not finite."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)

    def update(self, loss: Tensor, step: Tensor) -> None:
        """``loss`` is step ``step``'s (0-dim device tensors); in place, so a CUDA graph can hold it."""
        candidate = torch.where(torch.isfinite(loss), NO_BAD_STEP, step)
        torch.minimum(self.first_bad, candidate, out=self.first_bad)

    def reset(self) -> None:
        self.first_bad.fill_(NO_BAD_STEP)
