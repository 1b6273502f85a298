"""The Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

One model definition for every backend: each module holds its parameters and calls the functions
of ``vit_fast.ops`` with the backend of its model. The root ``ViTClassifier`` owns that choice (a
``BackendChoice``) and shares the one holder with every submodule that calls an op, so
``set_backend`` changes a single attribute. Switching backend changes no parameter, so one
``state_dict`` loads into any backend. Parameter names follow timm's ``VisionTransformer``
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``,
``head``), so weights move between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .config import ViTConfig


@dataclass(eq=False)
class BackendChoice:
    """The backend a model computes with. Held by reference, so every module sharing it sees a change."""

    name: str = "reference"  # one of vit_fast.config.BACKENDS

    def __post_init__(self) -> None:
        ops.check_backend(self.name)


class UsesBackend:
    """Mixin of the modules that call ``vit_fast.ops``: they read the backend through the holder that
    their root ViTClassifier hands them. A module built on its own, outside a model, computes with
    the reference math."""

    backend_choice: BackendChoice | None = None

    @property
    def backend(self) -> str:
        return self.backend_choice.name if self.backend_choice is not None else "reference"


class LayerNorm(UsesBackend, nn.LayerNorm):
    """nn.LayerNorm's parameters, computed by the backend; ``forward_add`` fuses the residual add."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.backend)

    def forward_add(self, x: Tensor, residual: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(LayerNorm(s), s) with s = scale * x + residual; ``scale`` is DropPath.keep_scale's (B,) vector."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, self.backend, scale=scale)


class Linear(UsesBackend, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias, self.backend)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, scale by 1/keep."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def keep_scale(self, like: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
        """The per-sample scale of a branch shaped like ``like`` (B, ...): (B,) values 0 or 1/keep
        in ``dtype`` (default like's, the branch's), drawn on its device; None when inactive.

        The fused kernels apply it where the branch joins the residual; ``forward`` multiplies by
        it. Either way one draw of B Bernoulli values per call, so a seed gives the same mask on
        every backend."""
        if not self.active:
            return None
        keep = 1.0 - self.p
        return like.new_empty((like.shape[0],), dtype=dtype).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.keep_scale(x)
        return x if scale is None else x * scale.view((x.shape[0],) + (1,) * (x.ndim - 1))


class PatchEmbed(UsesBackend, nn.Module):
    """Holds the patch projection as timm does (a Conv2d with stride = kernel = patch size)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=p, stride=p)

    def forward(self, images: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, N+1, D): the class token first, positions added.

        The class token and positional embedding are the classifier's parameters (timm's names
        ``cls_token`` and ``pos_embed``); they are passed in because the fused op computes all three
        steps at once."""
        return ops.patch_embed(images, self.proj.weight, self.proj.bias, cls_token, pos_embed, self.backend)


class Attention(UsesBackend, nn.Module):
    """Multi-head self-attention from a packed qkv projection."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.attn_dropout = cfg.attn_dropout
        self.qkv = Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.dim, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        p = self.attn_dropout if self.training else 0.0
        out = ops.attention_packed(qkv, p, self.backend)  # (B, N, D)
        return self.proj_drop(self.proj(out))


class Mlp(UsesBackend, nn.Module):
    """fc1 -> GELU -> fc2 (dropout after the activation and after fc2, as in timm)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.approximate = cfg.gelu_approximate
        self.dropout = cfg.dropout
        self.fc1 = Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: Tensor, residual: Tensor | None = None, drop_path: DropPath | None = None) -> Tensor:
        """residual + drop_path(MLP(x)); ``drop_path`` is the block's stochastic depth for this branch."""
        if self.training and self.dropout > 0.0:
            h = F.dropout(ops.gelu(self.fc1(x), self.approximate, self.backend), self.dropout)
            y = F.dropout(self.fc2(h), self.dropout)
            if drop_path is not None:
                y = drop_path(y)
            return y + residual if residual is not None else y
        # The mask in the dtype the branch has on the unfused path (the GEMM's: the autocast dtype
        # under autocast), so every backend scales by the same rounded 1/keep.
        scale = drop_path.keep_scale(x, ops.autocast_dtype(x) or x.dtype) if drop_path is not None else None
        return ops.mlp(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            self.approximate, self.backend, residual=residual, scale=scale,
        )


class ViTEncoder(nn.Module):
    """One pre-LN encoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.attn(self.norm1(x))
        # One op applies stochastic depth to the branch, produces the new residual stream and its
        # normalisation (one kernel on "fused").
        h, x = self.norm2.forward_add(branch, x, self.drop_path1.keep_scale(branch))
        # The residual add and the MLP branch's stochastic depth ride in fc2's epilogue on "fused".
        return self.mlp(h, residual=x, drop_path=self.drop_path2)


class ViTClassifier(UsesBackend, nn.Module):
    """Patch embedding, class token, positional embedding, encoder blocks, final LN, linear head."""

    def __init__(self, cfg: ViTConfig, backend: str = "reference") -> None:
        super().__init__()
        self.cfg = cfg
        self.backend_choice = BackendChoice(backend)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear rule, as timm
        self.blocks = nn.Sequential(*(ViTEncoder(cfg, r) for r in rates))
        self.norm = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.head = Linear(cfg.dim, cfg.num_classes)
        self.reset_parameters()
        for m in self.modules():
            if isinstance(m, UsesBackend):
                m.backend_choice = self.backend_choice

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's ViT initialisation: trunc-normal(0.02) for pos_embed and every Linear weight,
        zero biases, normal(1e-6) class token, LayerNorm weight 1 / bias 0, the patch Conv2d
        keeping PyTorch's default initialisation."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def set_backend(self, backend: str) -> "ViTClassifier":
        """Compute with ``backend`` from now on (every submodule reads this model's one holder)."""
        self.backend_choice.name = ops.check_backend(backend)
        return self

    def _check_images(self, images: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"expected floating-point images (normalised), got dtype {images.dtype}; "
                "convert uint8 images with vit_fast.data.normalize"
            )

    def forward_features(self, images: Tensor) -> Tensor:
        self._check_images(images)
        x = self.patch_embed(images, self.cls_token, self.pos_embed)  # (B, N+1, D)
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[:, 0])  # classify from the class token


def build_model(preset_or_cfg: str | ViTConfig, backend: str = "reference", **overrides) -> ViTClassifier:
    from .config import get_preset

    cfg = get_preset(preset_or_cfg, **overrides) if isinstance(preset_or_cfg, str) else preset_or_cfg.replace(**overrides)
    return ViTClassifier(cfg, backend=backend)
