"""vit_fast: a Vision Transformer for CIFAR-100 with fused Triton and CUDA kernels."""

from .config import BACKENDS, PRESETS, ViTConfig, get_preset
from .model import ViTClassifier, ViTEncoder, build_model

__all__ = ["BACKENDS", "PRESETS", "ViTConfig", "ViTClassifier", "ViTEncoder", "build_model", "get_preset"]
__version__ = "0.1.0"
