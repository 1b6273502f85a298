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


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating-point inputs of a fused op to the autocast dtype when autocast is on.

    Autocast knows nothing of our custom ops; the fused kernels take one 16-bit dtype for their
    activations (LayerNorm also accepts fp32 weights). So, at the op boundary, do what autocast
    does for a matmul: cast to ``torch.get_autocast_dtype``. The casts are differentiable, so
    fp32 parameters still receive fp32 gradients. Under autocast the fused backend therefore keeps
    its residual stream in the 16-bit dtype, where the torch backend keeps it in fp32.
    """
    first = next(t for t in tensors if t is not None)
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


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
    if backend in ("torch", "fused"):  # a plain GEMM: cuBLAS is what a fused linear would call too
        return F.linear(x, weight, bias)
    raise _unknown(backend)


def gelu(x: Tensor, approximate: str, backend: str) -> Tensor:
    if backend == "reference":
        return reference.gelu(x, approximate)
    if backend in ("torch", "fused"):
        return F.gelu(x, approximate=approximate)
    raise _unknown(backend)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str) -> Tensor:
    if backend == "reference":
        return reference.layer_norm(x, weight, bias, eps)
    if backend == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if backend == "fused":
        from .fused import layernorm

        (x,) = _autocast(x)
        return layernorm.layer_norm(x, weight, bias, eps)
    raise _unknown(backend)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    """(LayerNorm(x + residual), x + residual): the pre-LN block's residual step."""
    if backend == "fused":
        from .fused import layernorm

        x, residual = _autocast(x, residual)
        return layernorm.add_layer_norm(x, residual, weight, bias, eps)
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

        (qkv,) = _autocast(qkv)
        return attention.attention_packed(qkv)
    raise _unknown(backend)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    approximate: str,
    backend: str,
    residual: Tensor | None = None,
) -> Tensor:
    """fc2(GELU(fc1(x))) (+ residual), without dropout (the MLP module handles dropout)."""
    if backend == "fused":
        from .fused import mlp as fused_mlp

        args = _autocast(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
        return fused_mlp.mlp(*args[:5], approximate, args[5])
    h = gelu(linear(x, fc1_weight, fc1_bias, backend), approximate, backend)
    y = linear(h, fc2_weight, fc2_bias, backend)
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

        return fused_patch_embed.patch_embed(*_autocast(images, weight, bias, cls_token, pos_embed))
    raise _unknown(backend)
