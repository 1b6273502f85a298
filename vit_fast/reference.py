"""The reference math: every op of the ViT written out from scratch.

This module is the readable specification. The "reference" model backend runs it, and the tests
and benchmarks of every fused op import it instead of re-deriving it. Reductions whose accuracy
matters (LayerNorm statistics, the softmax) run in fp32 and cast once at the end, the same
contract the fused kernels implement; matrix products run in the input dtype.

Layouts:
  images      (B, C, H, W)
  tokens      (B, N, D)            N = number of patches + 1 (class token first)
  packed qkv  (B, N, 3, H, Dh)     the qkv projection's output viewed per head, as in timm
  q, k, v     (B, H, N, Dh)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype: fp32 for 16-bit inputs, fp32/fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dimension from its mean and (biased) variance, in fp32 or wider."""
    xf = _acc(x)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * _acc(weight) + _acc(bias)
    return y.to(x.dtype)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The pre-LN block's residual step: s = x + residual, y = LayerNorm(s). Returns (y, s)."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """exp(s - max s) / sum exp(s - max s), in fp32 or wider (subtracting the max keeps exp finite)."""
    sf = _acc(scores)
    e = torch.exp(sf - sf.amax(dim=dim, keepdim=True))
    return (e / e.sum(dim=dim, keepdim=True)).to(scores.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(Q K^T * scale) V for q, k, v of shape (B, H, N, Dh); scale defaults to 1/sqrt(Dh)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    probs = softmax(torch.matmul(q, k.transpose(-2, -1)) * scale)  # (B, H, N, N)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3, H, Dh) -> three (B, H, N, Dh) views (no copy)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def attention_packed(qkv: Tensor, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """Attention read from the packed projection (B, N, 3, H, Dh); output (B, N, H*Dh)."""
    B, N, three, H, Dh = qkv.shape
    assert three == 3, f"packed qkv must have shape (B, N, 3, H, Dh), got {tuple(qkv.shape)}"
    out = attention(*split_qkv(qkv), scale=scale, dropout_p=dropout_p)  # (B, H, N, Dh)
    return out.transpose(1, 2).reshape(B, N, H * Dh)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU(x) = x * Phi(x). "none": exact, with erf; "tanh": Hendrycks & Gimpel's approximation."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + b, with W of shape (out_features, in_features) as in nn.Linear."""
    y = torch.matmul(x, weight.t())
    return y + bias if bias is not None else y


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    approximate: str = "none",
    residual: Tensor | None = None,
) -> Tensor:
    """fc2(GELU(fc1(x))) (+ residual): the transformer MLP, optionally with the block's residual add."""
    y = linear(gelu(linear(x, fc1_weight, fc1_bias), approximate), fc2_weight, fc2_bias)
    return y + residual if residual is not None else y


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*p*p) by reshape, patches in row-major order.

    Each patch is flattened in (C, p, p) order, the order of a Conv2d weight (D, C, p, p), so a
    patch embedding is patchify followed by a matmul with weight.reshape(D, -1).
    """
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, Hp, p, Wp, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, Hp, Wp, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def patch_embed(
    images: Tensor, weight: Tensor, bias: Tensor, cls_token: Tensor, pos_embed: Tensor
) -> Tensor:
    """Images (B, C, H, W) -> tokens (B, N+1, D): patchify, project, add bias, prepend the class
    token, add the positional embedding. weight (D, C, p, p), bias (D,), cls_token (1, 1, D),
    pos_embed (1, N+1, D)."""
    D, _, p, _ = weight.shape
    tokens = linear(patchify(images, p), weight.reshape(D, -1), bias)  # (B, N, D)
    cls = cls_token.expand(images.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1) + pos_embed
