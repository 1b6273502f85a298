"""Model configuration: one dataclass and the named presets.

The CIFAR presets use 4x4 patches on 32x32 images, i.e. 64 patches plus the class token = 65 tokens;
``vit-64`` takes 64x64 images (Tiny-ImageNet, ImageNet 64x64) in 8x8 patches: the same 65 tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BACKENDS = ("reference", "torch", "fused")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32  # input images are (C, image_size, image_size)
    patch_size: int = 4  # square patches; must divide image_size
    in_channels: int = 3
    num_classes: int = 100  # CIFAR-100
    dim: int = 192  # token width D
    depth: int = 12  # number of encoder blocks
    num_heads: int = 3  # D must be a multiple of num_heads
    mlp_ratio: float = 4.0  # hidden width of the MLP = mlp_ratio * dim
    qkv_bias: bool = True
    dropout: float = 0.0  # after the positional embedding, the attention projection and the MLP
    attn_dropout: float = 0.0  # on the attention probabilities
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate in the last block
    layer_norm_eps: float = 1e-6  # timm's ViT uses 1e-6
    gelu_approximate: str = "none"  # "none" = exact erf GELU, "tanh" = the tanh approximation

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")

        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "num_heads"):
            positive_int(name)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                f"choose a patch size that is a divisor of {self.image_size}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of num_heads={self.num_heads}")
        if self.mlp_ratio <= 0 or int(self.dim * self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value}")
        # A zero or negative eps divides by zero (or takes the root of a negative) for a constant token.
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < float("inf")):
            raise ValueError(f"ViTConfig.layer_norm_eps must be a positive finite number, got {self.layer_norm_eps!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + class token

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, ViTConfig] = {
    # ViT-Ti/S widths from Touvron et al. 2021 (DeiT), here with 4x4 patches for 32x32 images.
    "vit-tiny": ViTConfig(dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit-small": ViTConfig(dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    # Lee et al. 2021, "Vision Transformer for Small-Size Datasets": their baseline ViT on
    # CIFAR-100 (dim 192, depth 9, 12 heads of 16, MLP ratio 2), reported at 73.81% top-1.
    "vit-cifar": ViTConfig(dim=192, depth=9, num_heads=12, mlp_ratio=2.0),
    # Ours, for 64x64 inputs: vit-cifar's encoder on 8x8 patches, so 64 patches + 1 = 65 tokens as on
    # CIFAR (the encoder's cost per image and every attention, LayerNorm and MLP shape are
    # vit-cifar's; only the patch embedding's 3 x 8 x 8 = 192 inputs per patch and the head
    # differ), with Tiny-ImageNet's 200 classes. Patch 4 would be 257 tokens: ~4x the encoder's work.
    "vit-64": ViTConfig(image_size=64, patch_size=8, num_classes=200, dim=192, depth=9, num_heads=12, mlp_ratio=2.0),
}


def get_preset(name: str, **overrides) -> ViTConfig:
    """The named preset, with any field overridden (e.g. num_classes=10)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
