"""vit_fast: a Vision Transformer for CIFAR-100 with fused Triton and CUDA kernels."""

from .config import BACKENDS, PRESETS, ViTConfig, get_preset

__all__ = ["BACKENDS", "PRESETS", "ViTConfig", "get_preset"]
__version__ = "0.1.0"
