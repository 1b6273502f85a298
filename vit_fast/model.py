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
        """(LayerNorm(s), s) with s = scale * x + residual; ``scale`` is stochastic depth's (B,) vector (DropPath)."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, self.backend, scale=scale)


class Linear(UsesBackend, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias, self.backend)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, scale by 1/keep.

    The per-sample vector is B values drawn from Bernoulli(keep = 1 - p), divided by keep: 0 or
    1/keep, in the branch's dtype. Inside a ``ViTClassifier`` every DropPath's vector of a step
    comes from one draw (``draw_keep_scales``: the model draws all of them at the start of its
    forward, two kernels for the whole step instead of two per DropPath) and reaches the block as
    a row of that draw; the fused kernels apply it where the branch joins the residual, the other
    backends multiply by it. A block or DropPath used on its own draws its vector itself
    (``keep_scale``). Either way the draw is a kernel of the step reading the device generator (no
    host value), so a step stays sync-free and a captured CUDA graph draws afresh on every replay,
    and a seed gives the same masks on every backend."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def keep_scale(self, like: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
        """This DropPath's own draw, for use outside a model: (B,) values 0 or 1/keep for a branch
        shaped like ``like`` (B, ...), in ``dtype`` (default like's, the branch's), on its device;
        None when inactive."""
        if not self.active:
            return None
        keep = 1.0 - self.p
        return like.new_empty((like.shape[0],), dtype=dtype).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """x scaled per sample by ``scale`` (B,) when given (a row of the model's draw), else by
        this DropPath's own draw."""
        if scale is None:
            scale = self.keep_scale(x)
        return x if scale is None else x * scale.view((x.shape[0],) + (1,) * (x.ndim - 1))


def keep_bits(rates: list[float]) -> Tensor:
    """The keep probabilities 1 - p of ``rates`` as a (len(rates), 1) int32 tensor of fp32 bit
    patterns, read back with ``.view(torch.float32)`` (a view, no kernel). Held as integers so that
    ``model.half()`` / ``.to(torch.bfloat16)``, which convert every floating buffer, cannot round
    them (bf16 has 0.8984 for 0.9): the law of the masks does not depend on the model's dtype."""
    return torch.tensor([[1.0 - p] for p in rates], dtype=torch.float32).view(torch.int32)


def draw_keep_scales(keep: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """Every DropPath's per-sample scale for one step in one draw: (R, B) with row r Bernoulli(keep[r])
    / keep[r] in ``dtype`` (0 or 1/keep, rounded once to the branch dtype), for ``keep`` (R, 1)
    fp32 on the device. Two kernels whatever R: the draw, and the division writing ``dtype``."""
    mask = torch.bernoulli(keep.expand(keep.shape[0], batch))  # (R, B) fp32 0/1
    scale = torch.empty(mask.shape, dtype=dtype, device=mask.device)
    return torch.div(mask, keep, out=scale)  # computed in fp32, stored in dtype: no separate cast


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

    def forward(self, x: Tensor, residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """residual + scale * MLP(x); ``scale`` (B,), optional, is the block's stochastic-depth
        vector for this branch (``DropPath``), in the branch's dtype."""
        if self.training and self.dropout > 0.0:
            h = F.dropout(ops.gelu(self.fc1(x), self.approximate, self.backend), self.dropout)
            y = F.dropout(self.fc2(h), self.dropout)
            if scale is not None:
                y = y * scale.view((y.shape[0],) + (1,) * (y.ndim - 1))
            return y + residual if residual is not None else y
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

    def forward(self, x: Tensor, scales: Tensor | None = None) -> Tensor:
        """x (B, N, D) -> the block's output; ``scales`` (2, B), optional: the stochastic-depth
        vectors of the attention and MLP branches (rows of the model's one draw per step, in the
        branch dtype). Without them a block in training mode draws its own. (``ViTClassifier``
        chains its blocks through ``branches`` instead, so that each block's last residual add
        rides in the next LayerNorm's op.)"""
        y, s, scale2 = self.branches(self.norm1(x), x, scales)
        if scale2 is not None:
            y = y * scale2.view((y.shape[0],) + (1,) * (y.ndim - 1))
        return s + y

    def branches(self, h: Tensor, x: Tensor, scales: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The block on input x with h = norm1(x) given: (y, s, scale2), where s = x + scale1 *
        attn(h) is the stream after the attention branch, y = mlp(norm2(s)) the MLP branch and
        scale2 its stochastic-depth vector (None when inactive). The block's output is
        s + scale2 * y, left to the caller: the classifier computes it in the next LayerNorm's
        ``forward_add`` (one kernel on "fused"), so no block output feeds two ops and the backward
        never sums two gradients of one stream tensor (an extra kernel per use)."""
        branch = self.attn(h)
        scale1, scale2 = self.keep_scales(x, scales)
        # One op applies stochastic depth to the branch, produces the new residual stream and its
        # normalisation (one kernel on "fused").
        h, s = self.norm2.forward_add(branch, x, scale1)
        return self.mlp(h), s, scale2

    def keep_scales(self, x: Tensor, scales: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Each branch's scale, None for an inactive DropPath (the kernels then skip it)."""
        dtype = branch_dtype(x)
        pair = []
        for row, drop_path in enumerate((self.drop_path1, self.drop_path2)):
            if not drop_path.active:
                pair.append(None)
            elif scales is not None:
                pair.append(scales[row])
            else:
                pair.append(drop_path.keep_scale(x, dtype))
        return pair[0], pair[1]


def branch_dtype(x: Tensor) -> torch.dtype:
    """The dtype of a residual branch computed from the stream ``x``: the GEMMs' (the autocast
    dtype under autocast), else x's. Stochastic depth's scales come in it, so every backend
    multiplies by the same rounded 1/keep."""
    return ops.autocast_dtype(x) or x.dtype


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
        # Block i's two DropPaths own rows 2i and 2i + 1 of the step's draw (None: no stochastic depth).
        self.register_buffer("drop_path_keep", keep_bits([r for r in rates for _ in range(2)])
                             if cfg.drop_path > 0 else None, persistent=False)
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

    def drop_path_scales(self, x: Tensor) -> Tensor | None:
        """The step's stochastic-depth scales of every block, (2 * depth, B) in the branch dtype,
        drawn at once (``draw_keep_scales``); None outside training or without stochastic depth."""
        if not self.training or self.drop_path_keep is None:
            return None
        return draw_keep_scales(self.drop_path_keep.view(torch.float32), x.shape[0], branch_dtype(x))

    def forward_features(self, images: Tensor) -> Tensor:
        self._check_images(images)
        x = self.patch_embed(images, self.cls_token, self.pos_embed)  # (B, N+1, D)
        scales = self.drop_path_scales(x)  # (2 * depth, B) or None
        x = self.pos_drop(x)
        if not len(self.blocks):
            return self.norm(x)
        # Each block's output x = s + scale2 * y is formed by the op that normalises it for the
        # next block (the final norm after the last), returning both: every stream tensor then has
        # one consumer, and the backward adds no gradients of its own (see ViTEncoder.branches).
        h = self.blocks[0].norm1(x)
        norms = [block.norm1 for block in self.blocks[1:]] + [self.norm]
        for i, (block, norm) in enumerate(zip(self.blocks, norms)):
            y, s, scale2 = block.branches(h, x, scales[2 * i:2 * i + 2] if scales is not None else None)
            h, x = norm.forward_add(y, s, scale2)
        return h

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[:, 0])  # classify from the class token


def build_model(preset_or_cfg: str | ViTConfig, backend: str = "reference", **overrides) -> ViTClassifier:
    from .config import get_preset

    cfg = get_preset(preset_or_cfg, **overrides) if isinstance(preset_or_cfg, str) else preset_or_cfg.replace(**overrides)
    return ViTClassifier(cfg, backend=backend)
