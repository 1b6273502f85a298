"""Training recipes as named presets: ``python -m vit_fast.train --recipe lee2021|basic|fast|lee2021-64``.

A recipe is every value that decides what a training run learns apart from the model and the
data: the augmentation, the regularisation and the optimisation schedule. Each preset is a frozen
dataclass; its field names are the training command's argument names (``--drop-path`` is
``drop_path``), whose defaults are None so that a flag given on the command line overrides the
preset and every other value comes from it (``resolve``). The checkpoint records the resolved
recipe and ``--resume`` refuses to continue under different values.

A shortened run keeps a sensible warm-up: when ``--epochs`` is at most the preset's warm-up (say
lee2021, 10 warm-up epochs, with ``--epochs 5``) and ``--warmup-epochs`` is not given, the warm-up
is scaled to the share of the run it has in the preset (10 of 100 epochs: 0.5 of 5), with a
warning (``fit_warmup``). An explicit ``--warmup-epochs`` longer than ``--epochs`` is an error
(``check``), as is a ``--min-lr`` above ``--lr``.

Sources of the lee2021 values (each field says which):
- [L] Lee, Lee & Song 2021, "Vision Transformer for Small-Size Datasets" (arXiv 2112.13492), which
  trains its ViTs with DeiT's augmentation and regularisation. The numbers are the argument
  defaults and training loop of the code the authors published with it
  (github.com/aanna0701/SPT_LSA_ViT, main.py); the README's recipe table lists the values that
  could not be confirmed there.
- [D] Touvron et al. 2021, "Training data-efficient image transformers" (DeiT), main.py's defaults
  (github.com/facebookresearch/deit), which Lee et al. follow.
- [T] PyTorch's AdamW defaults, which the authors' code keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from .augment.config import ERASE_MODES, MIX_MODES, POLICIES, AugmentConfig


@dataclass(frozen=True)
class Lee2021:
    """The published setup of Lee et al. 2021 for their CIFAR ViT, the runs behind the CIFAR-100
    accuracy the README cites."""

    name: str = "lee2021"
    # Augmentation, in the order it is applied.
    crop_padding: int = 4  # [L] RandomCrop(32, padding=4); zero padding
    flip: bool = True  # [L] RandomHorizontalFlip
    policy: str = "autoaugment"  # [L] --aa on, CIFAR10Policy (AutoAugment, Cubuk et al. 2019)
    randaugment_ops: int = 2  # only with policy randaugment (RandAugment's N, torchvision's default)
    randaugment_magnitude: int = 9  # only with policy randaugment (M of 31 bins; DeiT's m9)
    erase: float = 0.25  # [L] --re 0.25, [D] --reprob 0.25: random erasing probability
    erase_max_area: float = 0.4  # [L] --re_sh 0.4 (Zhong et al.'s default; DeiT/timm: 1/3)
    erase_mode: str = "const"  # [L] fills with the mean colour; [D] "pixel" (normal noise)
    mixup: float = 1.0  # [L] --alpha 1.0 (DeiT: 0.8): mixup Beta(alpha, alpha)
    cutmix: float = 1.0  # [L] --beta 1.0, [D] 1.0: cutmix Beta(alpha, alpha)
    mix_prob: float = 0.5  # [L] --mix_prob 0.5 (DeiT: 1.0): share of batches mixed at all
    mix_switch_prob: float = 0.5  # [L] 0.5 (hard-coded), [D] 0.5: cutmix rather than mixup
    mix_mode: str = "batch"  # [L], [D]: one draw per batch
    repeats: int = 3  # [L] --ra 3, [D] RASampler's 3: repeated augmentation
    # Regularisation.
    label_smoothing: float = 0.1  # [L] --smoothing 0.1, [D] 0.1
    drop_path: float = 0.1  # [L] --sd 0.1, [D] 0.1: stochastic depth of the last block
    dropout: float = 0.0  # [L] no dropout, [D] --drop 0
    ema: float = 0.0  # [L] no weight EMA (DeiT keeps one at 0.99996); 0 = off
    # Optimisation: AdamW, linear warm-up then cosine decay, per step.
    epochs: int = 100  # [L] --epochs 100
    batch_size: int = 128  # [L] --batch_size 128 (global batch)
    lr: float = 1e-3  # [L] --lr 0.001
    min_lr: float = 1e-5  # [D] --min-lr 1e-5 (the authors' scheduler source is not published)
    warmup_epochs: float = 10.0  # [L] --warmup 10
    weight_decay: float = 0.05  # [L] --weight-decay 5e-2, [D] 0.05
    beta1: float = 0.9  # [T]
    beta2: float = 0.999  # [T]
    # Ours, not the authors': [L] and [D] do not clip. Clipping at 1.0 is a cheap guard for bf16
    # autocast runs (one fused norm over all gradients, no host sync) and part of the step this
    # project accounts and benchmarks; --clip-grad 0 gives the authors' setting.
    clip_grad: float = 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def augmentation(self) -> AugmentConfig:
        """The recipe's augmentation, the loader's config (its fields are the recipe's). Label
        smoothing stays with the loss, which applies it to mixed targets as well."""
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})


@dataclass(frozen=True)
class Basic(Lee2021):
    """Random crop and flip only: lee2021 without its policy, erasing, mixing and repeated
    augmentation (the ablation baseline; optimisation and regularisation as lee2021)."""

    name: str = "basic"
    policy: str = "none"
    erase: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    repeats: int = 1


@dataclass(frozen=True)
class Fast(Basic):
    """A short schedule for quick runs and smoke tests of a setup, not a published recipe and not
    tuned: a fifth of lee2021's steps (20 epochs at batch 256), the learning rate scaled linearly
    with the batch, crop and flip only (basic's augmentation), no stochastic depth (a short run
    underfits rather than overfits, so the heavy regularisation of the 100-epoch recipe is left out)."""

    name: str = "fast"
    drop_path: float = 0.0
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    warmup_epochs: float = 2.0


@dataclass(frozen=True)
class Lee2021At64(Lee2021):
    """lee2021 for 64x64 images (Tiny-ImageNet, ImageNet 64x64; with ``--preset vit-64 --image-size
    64``): the random crop's padding scaled with the image, 8 pixels (lee2021's 4 of 32), everything
    else as lee2021. Ours, not a published recipe: the scaling keeps the crop's shift a share of the
    image, and the policy stays AutoAugment's CIFAR-10 policy, which lee2021 applies."""

    name: str = "lee2021-64"
    crop_padding: int = 8


RECIPES: dict[str, type[Lee2021]] = {"lee2021": Lee2021, "basic": Basic, "fast": Fast, "lee2021-64": Lee2021At64}
DEFAULT = "lee2021"
# The recipe's values, as argument names (everything but the name).
FIELDS = tuple(f.name for f in dataclasses.fields(Lee2021) if f.name != "name")


def get_recipe(name: str, log: Callable[[str], None] | None = None, **overrides) -> Lee2021:
    """The preset ``name`` with ``overrides`` (field name -> value; None keeps the preset's), its
    warm-up fitted to a shortened run unless ``warmup_epochs`` is given (``fit_warmup``, which
    warns through ``log``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown recipe fields {unknown}; expected some of {FIELDS}")
    recipe = dataclasses.replace(RECIPES[name](), **{k: v for k, v in overrides.items() if v is not None})
    return recipe if overrides.get("warmup_epochs") is not None else fit_warmup(recipe, log)


def resolve(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> Lee2021:
    """Fill every recipe argument left None in ``args`` from the preset ``args.recipe`` (in place)
    and return the resolved recipe. Idempotent: resolved arguments are no longer None.

    The preset's warm-up is fitted to a shortened run (``fit_warmup``); ``log`` gets the warning."""
    recipe = get_recipe(args.recipe, log, **{f: getattr(args, f, None) for f in FIELDS})
    for f in FIELDS:
        setattr(args, f, getattr(recipe, f))
    return recipe


def fit_warmup(recipe: Lee2021, log: Callable[[str], None] | None = None) -> Lee2021:
    """``recipe`` with its preset's warm-up scaled to a run that is not longer than it: when the
    preset's warm-up (lee2021: 10 epochs) is at least ``recipe.epochs``, the peak learning rate
    would never be reached (or reached at the very end, with no decay), so the warm-up keeps the
    share of the run it has in the preset's own schedule (lee2021: 10 of 100 epochs, so
    ``--epochs 5`` warms up for 0.5 epochs), with a warning to ``log``. Otherwise unchanged.
    Only for the preset's value: an explicit ``--warmup-epochs`` above ``--epochs`` is an error
    (``check``)."""
    preset = RECIPES[recipe.name]()
    if not (recipe.epochs > 0 and recipe.warmup_epochs >= recipe.epochs):
        return recipe
    warmup = preset.warmup_epochs * recipe.epochs / preset.epochs
    if log is not None:
        log(f"warning: recipe {recipe.name}'s {preset.warmup_epochs:g} warm-up epochs are at least --epochs "
            f"{recipe.epochs}: warming up for {warmup:g} epochs instead, the preset's share of its "
            f"{preset.epochs}-epoch schedule (pass --warmup-epochs to choose)")
    return dataclasses.replace(recipe, warmup_epochs=warmup)


def preset_help(field: str) -> str:
    """The presets' values of ``field`` for a --help line: "[lee2021 0.25, basic 0, fast 0, lee2021-64 0.25]"."""
    def shown(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    return "[" + ", ".join(f"{name} {shown(getattr(cls(), field))}" for name, cls in RECIPES.items()) + "]"


def add_augment_arguments(group) -> None:
    """The augmentation flags (defaults None: the recipe's value), shared by the training command
    and ``python -m vit_fast.data --preview``."""

    def add(flag: str, field: str, help: str, **kw) -> None:
        group.add_argument(flag, dest=field, default=None, help=f"{help} {preset_help(field)}", **kw)

    add("--crop-padding", "crop_padding", "random crop from the image zero-padded by this (0 = off)", type=int)
    add("--flip", "flip", "random horizontal flips", action=argparse.BooleanOptionalAction)
    add("--policy", "policy", "per-image augmentation policy", choices=POLICIES)
    add("--randaugment-ops", "randaugment_ops", "RandAugment: operations per image", type=int)
    add("--randaugment-magnitude", "randaugment_magnitude", "RandAugment: magnitude bin of 31", type=int)
    add("--erase", "erase", "random erasing probability (0 = off)", type=float)
    add("--erase-max-area", "erase_max_area", "largest erased fraction of an image", type=float)
    add("--erase-mode", "erase_mode", "erased pixels: mean colour, a random colour, per-pixel noise",
        choices=ERASE_MODES)
    add("--mixup", "mixup", "mixup Beta(alpha, alpha) (0 = off)", type=float)
    add("--cutmix", "cutmix", "cutmix Beta(alpha, alpha) (0 = off)", type=float)
    add("--mix-prob", "mix_prob", "probability that a batch is mixed at all", type=float)
    add("--mix-switch-prob", "mix_switch_prob", "probability of cutmix rather than mixup when both are on",
        type=float)
    add("--mix-mode", "mix_mode", "one mixing draw per batch or per image", choices=MIX_MODES)
    add("--repeats", "repeats", "repeated augmentation: each image this many times per epoch", type=int)
    add("--label-smoothing", "label_smoothing", "label smoothing", type=float)


def add_recipe_argument(parser) -> None:
    parser.add_argument("--recipe", default=DEFAULT, choices=sorted(RECIPES),
                        help="the training recipe; any recipe flag given overrides its value (docs/training.md)")


def check(recipe: Lee2021) -> None:
    """Raise ValueError naming the first value out of range."""
    r = recipe
    for f in dataclasses.fields(r):  # NaN fails every rule below; an infinity would pass some
        value = getattr(r, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value!r}")
    rules = [
        ("crop_padding", r.crop_padding >= 0, ">= 0"),
        ("policy", r.policy in POLICIES, f"one of {POLICIES}"),
        ("randaugment_ops", r.randaugment_ops >= 1, ">= 1"),
        ("randaugment_magnitude", 0 <= r.randaugment_magnitude < 31, "in [0, 31)"),
        ("erase", 0 <= r.erase <= 1, "in [0, 1]"),
        ("erase_max_area", 0.02 < r.erase_max_area <= 1, "in (0.02, 1]"),
        ("erase_mode", r.erase_mode in ERASE_MODES, f"one of {ERASE_MODES}"),
        ("mixup", r.mixup >= 0, ">= 0"),
        ("cutmix", r.cutmix >= 0, ">= 0"),
        ("mix_prob", 0 <= r.mix_prob <= 1, "in [0, 1]"),
        ("mix_switch_prob", 0 <= r.mix_switch_prob <= 1, "in [0, 1]"),
        ("mix_mode", r.mix_mode in MIX_MODES, f"one of {MIX_MODES}"),
        ("repeats", r.repeats >= 1, ">= 1"),
        ("label_smoothing", 0 <= r.label_smoothing < 1, "in [0, 1)"),
        ("drop_path", 0 <= r.drop_path < 1, "in [0, 1)"),
        ("dropout", 0 <= r.dropout < 1, "in [0, 1)"),
        ("ema", 0 <= r.ema < 1, "in [0, 1) (0 = off)"),
        ("epochs", r.epochs > 0, "positive"),
        ("batch_size", r.batch_size > 0, "positive"),
        ("lr", r.lr > 0, "positive"),
        ("min_lr", r.min_lr >= 0, ">= 0"),
        ("min_lr", r.min_lr <= r.lr, f"at most --lr ({r.lr:g})", "the cosine decays from --lr to --min-lr"),
        ("warmup_epochs", r.warmup_epochs >= 0, ">= 0"),
        # fit_warmup has scaled a preset's warm-up to a shorter run: this is an explicit value.
        ("warmup_epochs", r.warmup_epochs <= r.epochs, f"at most --epochs ({r.epochs})",
         "a longer warm-up never reaches the peak --lr"),
        ("weight_decay", r.weight_decay >= 0, ">= 0"),
        ("beta1", 0 <= r.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= r.beta2 < 1, "in [0, 1)"),
        ("clip_grad", r.clip_grad >= 0, ">= 0"),
    ]
    for field, ok, expected, *why in rules:
        if not ok:
            raise ValueError(f"--{field.replace('_', '-')} must be {expected}, got {getattr(r, field)!r}"
                             + "".join(f": {w}" for w in why))

