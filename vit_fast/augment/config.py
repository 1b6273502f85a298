"""``AugmentConfig``: the one augmentation config, what the loader draws and the pipeline applies,
under the recipe's field names (which are the training command's flags: ``crop_padding`` is
``--crop-padding``).

A training recipe hands out its augmentation as this config (``vit_fast.recipes``:
``recipe.augmentation()``). The defaults are the basic recipe's augmentation: random crop and flip,
everything else off. Label smoothing is not here: the loss applies it, to mixed targets as well
(smoothing is linear, so smoothing after mixing equals DeiT's smoothing before).
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("autoaugment", "randaugment", "trivialaugment", "none")
ERASE_MODES = ("const", "rand", "pixel")
MIX_MODES = ("batch", "elem")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation of a training batch, in the order it is applied (docs/data.md)."""

    crop_padding: int = 4  # random crop from the image zero-padded by this (0 = off)
    flip: bool = True  # random horizontal flip
    policy: str = "none"  # the per-image policy, one of POLICIES
    randaugment_ops: int = 2  # policy randaugment: operations per image (RandAugment's N)
    randaugment_magnitude: int = 9  # policy randaugment: magnitude bin of 31 (M)
    erase: float = 0.0  # random erasing probability (0 = off)
    erase_max_area: float = 0.4  # largest erased fraction of an image (the smallest is 0.02)
    erase_mode: str = "const"  # erased pixels (ERASE_MODES): the mean colour, a random colour, per-pixel noise
    mixup: float = 0.0  # mixup Beta(alpha, alpha) (0 = off)
    cutmix: float = 0.0  # cutmix Beta(alpha, alpha) (0 = off)
    mix_prob: float = 0.5  # probability that a batch ("batch") or an image ("elem") is mixed at all
    mix_switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on
    mix_mode: str = "batch"  # one mixing draw per batch or per image (MIX_MODES)
    repeats: int = 1  # repeated augmentation: each image this many times per epoch (the loader's order)

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on)."""
        return self.mixup > 0 or self.cutmix > 0
