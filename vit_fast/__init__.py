"""vit_fast: a Vision Transformer for CIFAR-100 with fused Triton and CUDA kernels.

The model's names are imported on first use (``__getattr__``), so that a command that needs no
torch (``python -m vit_fast.data prepare`` on a folder whose cache is current) starts without it.
"""

from .config import BACKENDS, PRESETS, ViTConfig, get_preset

__all__ = ["BACKENDS", "PRESETS", "ViTConfig", "ViTClassifier", "ViTEncoder", "build_model", "get_preset"]
__version__ = "0.1.0"
_FROM_MODEL = ("ViTClassifier", "ViTEncoder", "build_model")


def __getattr__(name: str):
    if name in _FROM_MODEL:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'vit_fast' has no attribute {name!r}")
