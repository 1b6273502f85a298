"""Fused patch embedding from the C++/CUDA extension ``vit_fast._C`` (sources in csrc/).

Images (B, C, H, W) -> tokens (B, N+1, D) in one pass: patchify, project with the Conv2d weight
(D, C, p, p), add the bias, prepend the class token, add the positional embedding. Matches
``vit_fast.reference.patch_embed``.

Public API:
    patch_embed(images, weight, bias, cls_token, pos_embed) -> Tensor
    extension_available() -> bool
    kernel_count(op, batch, num_patches, needs=None) -> int
        CUDA kernels one call of vit_fast::<op> launches

Registered ops (schema and CPU/CUDA kernels in csrc/patch_embed.cpp; the fake and autograd
implementations below make them work under opcheck and torch.compile(fullgraph=True)):
    vit_fast::patch_embed(images, weight, bias, cls_token, pos_embed) -> tokens
    vit_fast::patch_embed_backward(grad_out, images, weight, needs)
        -> (grad_images, grad_weight, grad_bias, grad_cls_token, grad_pos_embed)
The backward is one op, called once per backward; ``needs`` (five bools, the forward's inputs in
order) says which gradients are wanted and the others come back empty, as in
``vit_fast::mlp_backward``. The image gradient's kernel runs only when the images require grad
(the usual training step feeds images that do not).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

REBUILD_COMMAND = "pip install --no-build-isolation -e ."
# The extension's sources, present in a source checkout (editable install); absent from a wheel.
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_SOURCE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}
# The forward's inputs, in order: one flag each in the backward's ``needs``.
_INPUTS = ("images", "weight", "bias", "cls_token", "pos_embed")


def _load_extension() -> str | None:
    """Import vit_fast._C; return None on success, else why it cannot be used.

    A library older than any of its sources is refused rather than imported: it would register
    ops that no longer match the code, and the failure would surface far from its cause.
    """
    spec = importlib.util.find_spec("vit_fast._C")
    if spec is None or spec.origin is None:
        return "the extension vit_fast._C is not built"
    library = Path(spec.origin)
    if _CSRC.is_dir():
        sources = [p for p in _CSRC.iterdir() if p.suffix in _SOURCE_SUFFIXES]
        newest = max(sources, key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None and newest.stat().st_mtime > library.stat().st_mtime:
            return f"the extension {library} is stale: {newest} changed after it was built"
    try:
        importlib.import_module("vit_fast._C")
    except (ImportError, OSError) as exc:
        return f"importing the extension {library} failed ({exc})"
    return None


_LOAD_ERROR = _load_extension()


def extension_available() -> bool:
    """True when vit_fast._C is built, up to date and imported (its ops are registered)."""
    return _LOAD_ERROR is None


def _require_extension() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            f"vit_fast fused patch_embed is unavailable: {_LOAD_ERROR}. "
            f"Rebuild it from the repository root with: {REBUILD_COMMAND}"
        )


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
    """Images (B, C, H, W) -> tokens (B, N+1, D); weight (D, C, p, p), bias (D,), cls_token
    (1, 1, D), pos_embed (1, N+1, D), all of one dtype and device. Differentiable in every input."""
    _require_extension()
    return torch.ops.vit_fast.patch_embed(images, weight, bias, cls_token, pos_embed)


def kernel_count(op: str, batch: int, num_patches: int, needs: Sequence[bool] | None = None) -> int:
    """CUDA kernels one call of ``vit_fast::<op>`` launches for ``batch`` images of ``num_patches``
    patches, with the backward's ``needs`` mask (the launchers in csrc/patch_embed_cuda.cu; the C++
    code has no launch objects to ask, so this mirrors them and must change with them). Forward and
    image gradient (needs[0]): one kernel each. Parameter gradients (any of needs[1:]): the weight
    gradient's partial and reduce kernels, then two column sums (position embedding, bias) of a
    partial and a finish kernel each; a column sum over no rows launches only its finish kernel, and
    an empty batch or width launches nothing."""
    if op == "patch_embed":
        return 1 if batch else 0
    if op == "patch_embed_backward":
        if needs is None or len(needs) != len(_INPUTS):
            raise ValueError(f"needs must list {len(_INPUTS)} booleans ({', '.join(_INPUTS)}), got {needs}")
        if not batch:
            return 0
        return (1 if needs[0] else 0) + ((2 + 2 + (2 if num_patches else 1)) if any(needs[1:]) else 0)
    raise ValueError(f"op must be patch_embed or patch_embed_backward, got {op!r}")


# ----------------------------------------------------------------------------------------------
# Fake (shape-only) and autograd implementations of the C++ ops
# ----------------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    # RuntimeError, as the C++ TORCH_CHECKs raise: the fake and the real op fail alike.
    raise RuntimeError(message)


def _check_same(images: Tensor, t: Tensor, name: str, op: str = "patch_embed") -> None:
    if t.dtype != images.dtype:
        _fail(f"{op}: {name} has dtype {t.dtype} but images have dtype {images.dtype}; all inputs must share one dtype")
    if t.device != images.device:
        _fail(f"{op}: {name} is on {t.device} but images are on {images.device}")


def _check_shape(channels: int, height: int, width: int, weight: Tensor) -> tuple[int, int]:
    """(num_patches, dim), with the checks of make_shape in csrc/patch_embed.cpp."""
    w = tuple(weight.shape)
    if weight.dim() != 4 or w[2] != w[3]:
        _fail(f"patch_embed: weight must be a Conv2d weight of shape (D, C, p, p) with square patches, got {w}")
    p = w[2]
    if p < 1:
        _fail(f"patch_embed: patch size must be at least 1, got weight of shape {w}")
    if w[1] != channels:
        _fail(f"patch_embed: weight {w} expects {w[1]} input channels but the images have {channels}")
    if height % p or width % p:
        _fail(f"patch_embed: image size ({height}, {width}) must be a multiple of the patch size {p} "
              f"(weight of shape {w})")
    return (height // p) * (width // p), w[0]


def _check_forward(images: Tensor, weight: Tensor, bias: Tensor, cls_token: Tensor, pos_embed: Tensor) -> int:
    """The forward's checks (check_forward in csrc/patch_embed.cpp), on metadata only, so fake
    tensors (torch.compile, meta tensors, the cost account) are refused exactly as real ones are."""
    if images.dim() != 4:
        _fail(f"patch_embed: images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        _fail(f"patch_embed: images must be floating point, got {images.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed)):
        _check_same(images, t, name)
    num_patches, dim = _check_shape(images.shape[1], images.shape[2], images.shape[3], weight)
    if tuple(bias.shape) != (dim,):
        _fail(f"patch_embed: bias must have shape ({dim},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if tuple(cls_token.shape) != (1, 1, dim):
        _fail(f"patch_embed: cls_token must have shape (1, 1, {dim}), got {tuple(cls_token.shape)}")
    if tuple(pos_embed.shape) != (1, num_patches + 1, dim):
        _fail(f"patch_embed: pos_embed must have shape (1, {num_patches + 1}, {dim}) for {num_patches} patches of "
              f"images {tuple(images.shape)} with weight {tuple(weight.shape)}, got {tuple(pos_embed.shape)}")
    return num_patches


def _check_grad_out(grad_out: Tensor, weight: Tensor, batch: int, num_patches: int) -> None:
    expected = (batch, num_patches + 1, weight.shape[0])
    if tuple(grad_out.shape) != expected:
        _fail(f"patch_embed backward: grad_out must have shape {expected}, got {tuple(grad_out.shape)}")
    if grad_out.dtype != weight.dtype:
        _fail(f"patch_embed backward: grad_out has dtype {grad_out.dtype} but weight has dtype {weight.dtype}")
    if grad_out.device != weight.device:
        _fail(f"patch_embed backward: grad_out is on {grad_out.device} but weight is on {weight.device}")


def _check_backward(grad_out: Tensor, images: Tensor, weight: Tensor, needs: Sequence[bool]) -> None:
    """check_backward and read_needs in csrc/patch_embed.cpp, in that order."""
    if images.dim() != 4:
        _fail(f"patch_embed backward: images must have shape (B, C, H, W), got {tuple(images.shape)}")
    _check_same(images, weight, "weight", "patch_embed backward")
    num_patches, _ = _check_shape(images.shape[1], images.shape[2], images.shape[3], weight)
    _check_grad_out(grad_out, weight, images.shape[0], num_patches)
    if len(needs) != len(_INPUTS):  # a ValueError, as TORCH_CHECK_VALUE raises and mlp_backward's check
        raise ValueError(f"needs must list {len(_INPUTS)} booleans ({', '.join(_INPUTS)}), got {list(needs)}")


def _register() -> None:
    @torch.library.register_fake("vit_fast::patch_embed")
    def _forward_fake(images, weight, bias, cls_token, pos_embed):
        num_patches = _check_forward(images, weight, bias, cls_token, pos_embed)
        return images.new_empty((images.shape[0], num_patches + 1, weight.shape[0]))

    @torch.library.register_fake("vit_fast::patch_embed_backward")
    def _backward_fake(grad_out, images, weight, needs):
        _check_backward(grad_out, images, weight, needs)
        D = weight.shape[0]
        shapes = (images.shape, weight.shape, (D,), (1, 1, D), (1, grad_out.shape[1], D))
        # Unneeded gradients: empty (0,) placeholders in the images' dtype, as the C++ op returns.
        return tuple(images.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))

    def setup_context(ctx, inputs, output):
        images, weight, _bias, _cls_token, _pos_embed = inputs
        ctx.save_for_backward(images, weight)

    def backward(ctx, grad_out):
        images, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        grads = torch.ops.vit_fast.patch_embed_backward(grad_out, images, weight, needs)
        return tuple(g if need else None for g, need in zip(grads, needs))

    torch.library.register_autograd("vit_fast::patch_embed", backward, setup_context=setup_context)


if _LOAD_ERROR is None:
    _register()
