"""Training checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled classes):

  format      "vit_fast/1"
  config      ViTConfig as a dict          model      state_dict (timm parameter names)
  optimizer   state_dict                   scheduler  state_dict
  epoch       epochs completed             step       optimizer steps taken
  rng         {"torch": ByteTensor, "cuda": [ByteTensor, ...]}
  args        the training arguments       data       {"dataset", "classes", "mean", "std"}
  rng_ranks   data-parallel runs only: every rank's rng state, in rank order ("rng" is rank 0's)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "vit_fast/1"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temporary file in the same directory, then rename over ``path``: a crash in the
    middle of writing never leaves a truncated checkpoint behind (os.replace is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a vit_fast checkpoint (format {found!r}, expected {FORMAT!r})")
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry; it is incomplete")
    return ckpt


def load_model(path: str | Path, backend: str = "torch", map_location="cpu"):
    """The model stored in a checkpoint, in eval mode, and the checkpoint dict."""
    from .config import ViTConfig
    from .model import ViTClassifier

    ckpt = load_checkpoint(path, map_location)
    model = ViTClassifier(ViTConfig.from_dict(ckpt["config"]), backend=backend)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {err}") from err
    return model.eval(), ckpt
