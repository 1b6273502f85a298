"""Fused patch embedding from the C++/CUDA extension ``vit_fast._C`` (sources in csrc/).

Images (B, C, H, W) -> tokens (B, N+1, D) in one pass: patchify, project with the Conv2d weight
(D, C, p, p), add the bias, prepend the class token, add the positional embedding. Matches
``vit_fast.reference.patch_embed``.

Public API:
    patch_embed(images, weight, bias, cls_token, pos_embed) -> Tensor
    extension_available() -> bool
    kernel_count(op, batch, num_patches) -> int   CUDA kernels one call of vit_fast::<op> launches

Registered ops (schema and CPU/CUDA kernels in csrc/patch_embed.cpp; the fake and autograd
implementations below make them work under opcheck and torch.compile(fullgraph=True)):
    vit_fast::patch_embed(images, weight, bias, cls_token, pos_embed) -> tokens
    vit_fast::patch_embed_backward(grad_out, images, weight)
        -> (grad_weight, grad_bias, grad_cls_token, grad_pos_embed)
    vit_fast::patch_embed_backward_images(grad_out, weight, height, width) -> grad_images
The image gradient is its own op and runs only when the images require grad (the usual training
step feeds images that do not).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from torch import Tensor

REBUILD_COMMAND = "pip install --no-build-isolation -e ."
# The extension's sources, present in a source checkout (editable install); absent from a wheel.
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_SOURCE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}


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


def kernel_count(op: str, batch: int, num_patches: int) -> int:
    """CUDA kernels one call of ``vit_fast::<op>`` launches for ``batch`` images of ``num_patches``
    patches (the launchers in csrc/patch_embed_cuda.cu; the C++ code has no launch objects to ask,
    so this mirrors them and must change with them). Forward and image gradient: one kernel each.
    Parameter gradients: the weight gradient's partial and reduce kernels, then two column sums
    (position embedding, bias) of a partial and a finish kernel each; a column sum over no rows
    launches only its finish kernel, and an empty batch or width launches nothing."""
    if op in ("patch_embed", "patch_embed_backward_images"):
        return 1 if batch else 0
    if op == "patch_embed_backward":
        return 2 + 2 + (2 if num_patches else 1) if batch else 0
    raise ValueError(f"op must be patch_embed, patch_embed_backward or patch_embed_backward_images, got {op!r}")


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


def _check_backward(grad_out: Tensor, images: Tensor, weight: Tensor) -> None:
    if images.dim() != 4:
        _fail(f"patch_embed backward: images must have shape (B, C, H, W), got {tuple(images.shape)}")
    _check_same(images, weight, "weight", "patch_embed backward")
    num_patches, _ = _check_shape(images.shape[1], images.shape[2], images.shape[3], weight)
    _check_grad_out(grad_out, weight, images.shape[0], num_patches)


def _check_backward_images(grad_out: Tensor, weight: Tensor, height: int, width: int) -> None:
    if grad_out.dim() != 3:
        _fail(f"patch_embed backward: grad_out must have shape (B, N + 1, D), got {tuple(grad_out.shape)}")
    if weight.dim() != 4:
        _fail(f"patch_embed backward: weight must have shape (D, C, p, p), got {tuple(weight.shape)}")
    num_patches, _ = _check_shape(weight.shape[1], height, width, weight)
    _check_grad_out(grad_out, weight, grad_out.shape[0], num_patches)


def _register() -> None:
    @torch.library.register_fake("vit_fast::patch_embed")
    def _forward_fake(images, weight, bias, cls_token, pos_embed):
        num_patches = _check_forward(images, weight, bias, cls_token, pos_embed)
        return images.new_empty((images.shape[0], num_patches + 1, weight.shape[0]))

    @torch.library.register_fake("vit_fast::patch_embed_backward")
    def _backward_fake(grad_out, images, weight):
        _check_backward(grad_out, images, weight)
        D = weight.shape[0]
        return (
            weight.new_empty(weight.shape),
            weight.new_empty((D,)),
            weight.new_empty((1, 1, D)),
            weight.new_empty((1, grad_out.shape[1], D)),
        )

    @torch.library.register_fake("vit_fast::patch_embed_backward_images")
    def _backward_images_fake(grad_out, weight, height, width):
        _check_backward_images(grad_out, weight, height, width)
        return grad_out.new_empty((grad_out.shape[0], weight.shape[1], height, width))

    def setup_context(ctx, inputs, output):
        images, weight, _bias, _cls_token, _pos_embed = inputs
        ctx.save_for_backward(images, weight)

    def backward(ctx, grad_out):
        images, weight = ctx.saved_tensors
        needs_images, *needs_params = ctx.needs_input_grad
        grad_images = None
        if needs_images:
            grad_images = torch.ops.vit_fast.patch_embed_backward_images(
                grad_out, weight, images.shape[2], images.shape[3]
            )
        param_grads = [None] * 4
        if any(needs_params):
            # One pass yields all four; the ones nobody asked for are dropped (they are small).
            param_grads = torch.ops.vit_fast.patch_embed_backward(grad_out, images, weight)
        return grad_images, *(g if need else None for g, need in zip(param_grads, needs_params))

    torch.library.register_autograd("vit_fast::patch_embed", backward, setup_context=setup_context)


if _LOAD_ERROR is None:
    _register()
