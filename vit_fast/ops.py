"""One public function per op of the ViT, dispatching on the backend.

  "reference"  vit_fast.reference: the math written out (the readable spec)
  "torch"      PyTorch built-ins: F.linear, F.layer_norm, F.gelu, F.scaled_dot_product_attention,
               conv2d patchify (what users pick today, and the benchmarks' baseline)
  "fused"      our registered ops in vit_fast.fused (Triton kernels and the C++/CUDA extension)

Modules call these functions and never launch kernels themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .config import BACKENDS


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast dtype of ``t``'s device when autocast is on there, else None."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _per_sample(scale: Tensor, like: Tensor) -> Tensor:
    """A (B,) per-sample scale viewed to broadcast over ``like`` (B, ...)."""
    return scale.view((like.shape[0],) + (1,) * (like.dim() - 1))


def _unknown(backend: str) -> ValueError:
    return ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of BACKENDS, else the error every op raises for it."""
    if backend not in BACKENDS:
        raise _unknown(backend)
    return backend


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    if backend == "reference":
        return reference.linear(x, weight, bias)
    if backend == "fused" and autocast_dtype(x) is not None and x.dtype != weight.dtype:
        from .fused import linear as fused_linear

        # Under autocast cuBLAS would need the fp32 weight and bias cast to 16 bits and their
        # gradients cast back (four standalone casts per linear and step): the Triton matmul
        # converts them in registers instead.
        return fused_linear.linear(x.to(autocast_dtype(x)), weight, bias)
    if backend in ("torch", "fused"):  # a plain GEMM: cuBLAS
        return F.linear(x, weight, bias)
    raise _unknown(backend)


def gelu(x: Tensor, approximate: str, backend: str) -> Tensor:
    if backend == "reference":
        return reference.gelu(x, approximate)
    if backend in ("torch", "fused"):
        return F.gelu(x, approximate=approximate)
    raise _unknown(backend)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str) -> Tensor:
    if backend == "reference":
        return reference.layer_norm(x, weight, bias, eps)
    if backend == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if backend == "fused":
        from .fused import layernorm

        # Under autocast y comes out in the autocast dtype, ready for the GEMM that reads it (the
        # torch backend's fp32 LayerNorm output is cast there by autocast instead).
        return layernorm.layer_norm(x, weight, bias, eps, out_dtype=autocast_dtype(x))
    raise _unknown(backend)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(LayerNorm(s), s) with s = scale * x + residual: the pre-LN block's residual step.

    ``scale`` (B,), optional, is stochastic depth's per-sample keep/scale vector for the branch x
    (``model.DropPath``: a row of the model's one draw per step). Under autocast on "fused", s
    keeps the residual's dtype (fp32) and LayerNorm(s) comes out in the autocast dtype, as the
    torch backend's next GEMM sees it.
    """
    if backend == "fused":
        from .fused import layernorm

        return layernorm.add_layer_norm(x, residual, weight, bias, eps, out_dtype=autocast_dtype(x), scale=scale)
    if scale is not None:
        x = x * _per_sample(scale, x)
    s = x + residual
    return layer_norm(s, weight, bias, eps, backend), s


def attention_packed(qkv: Tensor, dropout_p: float, backend: str) -> Tensor:
    """Multi-head self-attention from the packed projection (B, N, 3, H, Dh) -> (B, N, H*Dh)."""
    if backend == "reference":
        return reference.attention_packed(qkv, dropout_p=dropout_p)
    if backend == "torch":
        B, N, _, H, Dh = qkv.shape
        q, k, v = reference.split_qkv(qkv)  # (B, H, N, Dh) views
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(B, N, H * Dh)
    if backend == "fused":
        if dropout_p > 0.0:
            raise ValueError(
                f"the fused attention kernel has no dropout (attn_dropout={dropout_p}); "
                "set attn_dropout=0 or use the 'torch' backend"
            )
        from .fused import attention

        return attention.attention_packed(qkv)  # casts to the autocast dtype itself, only when needed
    raise _unknown(backend)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    approximate: str,
    backend: str,
    residual: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """scale * fc2(GELU(fc1(x))) (+ residual), without dropout (the MLP module handles dropout).

    ``scale`` (B,), optional: stochastic depth's per-sample keep/scale vector for the branch. Under
    autocast on "fused" the parameters and the residual stay fp32 (converted in the kernels) and
    the output has the residual's dtype, as the torch backend's ``residual + branch`` does.
    """
    if backend == "fused":
        from .fused import mlp as fused_mlp

        dtype = autocast_dtype(x)
        if dtype is not None and x.dtype != dtype:  # the model hands in the autocast dtype already
            x = x.to(dtype)
        return fused_mlp.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    h = gelu(linear(x, fc1_weight, fc1_bias, backend), approximate, backend)
    y = linear(h, fc2_weight, fc2_bias, backend)
    if scale is not None:
        y = y * _per_sample(scale, y)
    return y + residual if residual is not None else y


def patch_embed(
    images: Tensor, weight: Tensor, bias: Tensor, cls_token: Tensor, pos_embed: Tensor, backend: str
) -> Tensor:
    """Images (B, C, H, W) -> tokens (B, N+1, D) with the class token and positional embedding."""
    if backend == "reference":
        return reference.patch_embed(images, weight, bias, cls_token, pos_embed)
    if backend == "torch":
        p = weight.shape[-1]
        tokens = F.conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = cls_token.expand(images.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + pos_embed
    if backend == "fused":
        from .fused import patch_embed as fused_patch_embed

        # In the parameters' dtype, autocast or not: the tokens are the residual stream, fp32 under
        # autocast as on the torch backend (whose cat + pos_embed promote to fp32), and the
        # projection (K = C * p * p = 48 for CIFAR) is too small to gain from 16 bits.
        if images.dtype != weight.dtype:
            images = images.to(weight.dtype)
        return fused_patch_embed.patch_embed(images, weight, bias, cls_token, pos_embed)
    raise _unknown(backend)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float, backend: str) -> Tensor:
    """The training loss: batch-mean cross-entropy of logits (B, K) against labels (B,) or soft
    targets (B, K), with label smoothing; a 0-dim fp32 tensor.

    "fused" reads the logits in their dtype in one kernel (no ``logits.float()`` cast and none of
    its gradient; see ``vit_fast.fused.cross_entropy`` for its edge cases); the other backends
    compute ``F.cross_entropy`` in fp32."""
    if backend == "fused":
        from .fused import cross_entropy as fused_cross_entropy

        return fused_cross_entropy.cross_entropy(logits, target, label_smoothing)
    if backend in ("reference", "torch"):
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    raise _unknown(backend)
