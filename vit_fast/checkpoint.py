"""Training checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled classes):

  format      "vit_fast/1"
  config      ViTConfig as a dict          model      state_dict (timm parameter names)
  optimizer   state_dict                   scheduler  state_dict
  epoch       epochs completed             step       optimizer steps taken
  rng         {"torch": ByteTensor, "cuda": [ByteTensor, ...]}
  args        the training arguments       data       {"dataset", "classes", "mean", "std"}
  rng_ranks   data-parallel runs only: every rank's rng state, in rank order ("rng" is rank 0's)
  metrics     the last epoch's metrics line (also in metrics.jsonl)
  ema         --ema runs only: the averaged weights, a state_dict like "model"
  weights     best.pt only: "raw" or "ema", which weights its "model" entry holds
  kernels     --fused runs only: ours or the library's per op, as chosen at start-up
              (``vit_fast.kernel_choice.KernelChoice.to_dict``); --resume keeps it, load_model uses it

Integrity. torch.load does not check the CRC-32 that the zip container stores for each record
(a flipped byte in a tensor loads silently), so ``load_checkpoint`` first reads every record
through Python's zipfile, which does; then it checks that the entries the caller needs are there
with the right types, and that every floating tensor of the model and optimizer state is finite.
``save_checkpoint`` refuses to write a non-finite state, writes with CRCs on, and re-reads the new
file before it replaces the previous one, so a good checkpoint is only ever replaced by a good one.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

FORMAT = "vit_fast/1"

# Which weights of a checkpoint to run: the trained ones or their exponential moving average (--ema).
WEIGHTS = ("raw", "ema")

# The entries a checkpoint must have for each use, and the type each entry must have.
MODEL_ENTRIES = ("config", "model")
RESUME_ENTRIES = ("config", "model", "optimizer", "scheduler", "epoch", "step", "rng", "args", "data")
_ENTRY_TYPES = {"config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "step": int,
                "rng": dict, "args": dict, "data": dict}


class CheckpointError(RuntimeError):
    pass


def verify_container(path: str | Path) -> None:
    """Check every record of the checkpoint's zip container against its stored CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint (not a readable zip "
                              f"archive: {err})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} does not match its stored CRC-32")


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the model and optimizer state of a checkpoint dict."""
    model, optimizer = state.get("model"), state.get("optimizer")
    found = [(f"model[{k!r}]", v) for k, v in model.items() if isinstance(v, torch.Tensor)] if isinstance(model, dict) else []
    opt_state = optimizer.get("state") if isinstance(optimizer, dict) else None
    for param, entries in opt_state.items() if isinstance(opt_state, dict) else ():
        if isinstance(entries, dict):
            found += [(f"optimizer state[{param!r}][{k!r}]", v) for k, v in entries.items() if isinstance(v, torch.Tensor)]
    return found


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating tensors of the model and optimizer state holding a NaN or an infinity."""
    floats = [(name, t) for name, t in _tensors(state) if t.is_floating_point() or t.is_complex()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(floats[0][1].device) for _, t in floats]).tolist()  # one sync
    return [name for (name, _), ok in zip(floats, finite) if not ok]


def check_structure(ckpt: dict, path: str | Path, required: tuple[str, ...]) -> None:
    """A one-line CheckpointError naming the first entry that ``required`` needs and ``ckpt`` lacks
    or holds with the wrong type."""
    for key in required:
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} is incomplete: it has no {key!r} entry (has {sorted(ckpt)})")
    # Only what the caller uses is checked: evaluate reports a missing data entry in its own words.
    for key in required:
        kind = _ENTRY_TYPES[key]
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"checkpoint {path}: entry {key!r} should be a {kind.__name__}, "
                                  f"got {type(ckpt[key]).__name__}")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)] if "model" in required else []
    if bad:
        raise CheckpointError(f"checkpoint {path}: 'model' should map parameter names to tensors, but {bad[0]!r} "
                              f"is a {type(ckpt['model'][bad[0]]).__name__}")
    if "optimizer" in required and not (isinstance(ckpt["optimizer"].get("state"), dict)
                                        and isinstance(ckpt["optimizer"].get("param_groups"), list)):
        raise CheckpointError(f"checkpoint {path}: 'optimizer' should have a 'state' dict and a 'param_groups' "
                              f"list, has {sorted(ckpt['optimizer'])}")
    if "rng" in required and not isinstance(ckpt["rng"].get("torch"), torch.Tensor):
        raise CheckpointError(f"checkpoint {path}: 'rng' has no torch generator state ('torch' tensor)")
    for key in ("epoch", "step"):
        if key in required and ckpt[key] < 0:
            raise CheckpointError(f"checkpoint {path}: {key!r} must be >= 0, got {ckpt[key]}")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temporary file in the same directory, verify it, then rename over ``path``: a
    crash in the middle of writing never leaves a truncated checkpoint behind (os.replace is
    atomic), and a state that is not finite, or a file that does not read back intact, never
    replaces the checkpoint already there."""
    path = Path(path)
    bad = non_finite_tensors(state)
    if bad:
        kept = f"{path} still holds the last good checkpoint" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"refusing to write {path}: {len(bad)} tensor(s) hold NaN or infinity, first "
                              f"{bad[0]} (the training diverged); {kept}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    crc_was = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(True)  # verify_container needs the records' CRCs written
        torch.save({"format": FORMAT, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        verify_container(tmp)
        os.replace(tmp, path)
    finally:
        torch.serialization.set_crc32_options(crc_was)
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location="cpu", required: tuple[str, ...] = MODEL_ENTRIES) -> dict:
    """The checkpoint at ``path``, checked as the module docstring says; ``required`` names the
    entries the caller uses (MODEL_ENTRIES to run the model, RESUME_ENTRIES to continue training)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; expected the checkpoint.pt file written by "
                              "vit_fast.train")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_container(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a vit_fast checkpoint (format {found!r}, expected {FORMAT!r})")
    check_structure(ckpt, path, required)
    bad = non_finite_tensors(ckpt)
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: {len(bad)} tensor(s) hold NaN or infinity, first {bad[0]}")
    return ckpt


def select_weights(ckpt: dict, path: str | Path, weights: str | None = None) -> tuple[dict, str]:
    """(state_dict, "raw" or "ema"): the weights of ``ckpt`` that ``weights`` names. None takes the
    "model" entry, which is the raw weights, except in a best.pt whose "weights" entry says it
    holds the EMA ones. "ema" takes the "ema" entry, or the "model" entry of such a best.pt."""
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS} or None, got {weights!r}")
    holds = ckpt.get("weights", "raw")  # what the "model" entry is
    if weights is None or weights == holds:
        return ckpt["model"], holds
    if weights == "ema":
        ema = ckpt.get("ema")
        if ema is None and "weights" in ckpt:
            raise CheckpointError(f"checkpoint {path} holds only the raw weights (its 'weights' entry: it is a "
                                  "best.pt whose raw weights scored higher); use --weights raw")
        if ema is None:
            raise CheckpointError(f"checkpoint {path} has no EMA weights (it was trained without --ema); "
                                  "use the raw weights (--weights raw)")
        bad = [k for k, v in ema.items() if not isinstance(v, torch.Tensor)] if isinstance(ema, dict) else ["(all)"]
        if bad:
            raise CheckpointError(f"checkpoint {path}: 'ema' should map parameter names to tensors like 'model', "
                                  f"but {bad[0]!r} is not a tensor")
        nonfinite = non_finite_tensors({"model": ema})
        if nonfinite:
            raise CheckpointError(f"checkpoint {path} is corrupt: its EMA weights hold NaN or infinity, first "
                                  f"{nonfinite[0].replace('model', 'ema', 1)}")
        return ema, "ema"
    raise CheckpointError(f"checkpoint {path} holds only the EMA weights (its 'weights' entry: it is a best.pt "
                          "whose EMA weights scored higher); use --weights ema")


def load_model(path: str | Path, backend: str = "torch", map_location="cpu", weights: str | None = None):
    """The model stored in a checkpoint, in eval mode, and the checkpoint dict with its "model" entry
    set to the weights loaded and its "weights" entry to their kind, "raw" or "ema" (``weights``
    chooses them, see ``select_weights``; None, the default, loads the "model" entry). On "fused" it runs the kernels the training run chose (the ``kernels`` entry;
    ours for every op without one)."""
    from .config import ViTConfig
    from .kernel_choice import KernelChoice
    from .model import ViTClassifier

    ckpt = load_checkpoint(path, map_location)
    try:
        cfg = ViTConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model configuration: {err}") from None
    model = ViTClassifier(cfg, backend=backend)
    if backend == "fused" and ckpt.get("kernels") is not None:
        try:
            model.set_kernels(KernelChoice.from_dict(ckpt["kernels"]))
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: its 'kernels' entry does not read: {err}") from None
    state, held = select_weights(ckpt, path, weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {err}") from err
    return model.eval(), {**ckpt, "model": state, "weights": held}
