"""Device and runtime helpers shared by training, evaluation and prediction.

Public API: ``check_device_name``, ``resolve_device``, ``check_backend_device``, ``autocast``,
``synchronize``, ``rng_state``, ``set_rng_state``, ``rank_seed``, ``restore_rng``.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .cli import UsageError
from .distributed import World


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> None:
    """A UsageError naming ``name`` unless it is one of DEVICE_FORMS (whether this machine has that
    device is resolve_device's question)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        raise UsageError(f"--device {name!r} is not a device; expected {DEVICE_FORMS}")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` as a device. Any other name is a
    UsageError naming it; CUDA asked for on a machine without it, or a GPU index it does not have,
    is a one-line SystemExit (status 1)."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def check_backend_device(backend: str, device: torch.device) -> None:
    """The fused backend runs Triton and CUDA kernels: a GPU, or Triton's interpreter on the CPU."""
    from .fused.launch import interpreting  # the one place that reads TRITON_INTERPRET

    if backend == "fused" and device.type != "cuda" and not interpreting():
        raise SystemExit(
            f"--fused runs our Triton and CUDA kernels, which need an NVIDIA GPU, but the device is {device}. "
            "Use --backend torch on this machine, or set TRITON_INTERPRET=1 to run the kernels in Triton's "
            "interpreter on the CPU (very slow; for debugging only)."
        )


def autocast(device: torch.device, enabled: bool, cache_enabled: bool = True) -> torch.autocast:
    """The bf16 mixed-precision context every forward pass of a run uses (a no-op when disabled).
    ``cache_enabled=False`` recomputes autocast's 16-bit weight copies on every use, as a CUDA
    graph replay must (a cache filled during capture would hold stale weights)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache_enabled)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_state(device: torch.device | None = None) -> dict:
    """The random state to checkpoint. A data-parallel rank passes its GPU: reading every GPU's
    state (the single-process default) would open a CUDA context on each GPU from each rank."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif device is None and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s torch generator in a data-parallel run."""
    return seed * 1_000_003 + rank + 1


def restore_rng(ckpt: dict, world: World, device: torch.device, seed: int, epoch: int,
                log: Callable[[str], None]) -> None:
    """Each rank continues its own random stream when the world size is unchanged."""
    ranks = ckpt.get("rng_ranks")
    if not world.is_distributed:
        set_rng_state(ckpt["rng"])
    elif ranks is not None and len(ranks) == world.size:
        set_rng_state(ranks[world.rank], device)
    else:
        saved = len(ranks) if ranks is not None else 1
        torch.manual_seed(rank_seed(seed, world.rank) + 7919 * epoch)
        log(f"note: the checkpoint was written by {saved} process(es), this run has {world.size}: the data order "
            "and augmentation continue exactly, stochastic depth and dropout masks from fresh per-rank seeds")
