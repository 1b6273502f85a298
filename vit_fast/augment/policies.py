"""The per-image augmentation policies, as torchvision defines them: AutoAugment's CIFAR-10 policy
(Cubuk et al. 2019), RandAugment(N, M) and TrivialAugment-Wide, as ``Policy``: each image draws its
own sub-policy / ops / magnitudes / signs (``Policy.draw``), applied by ``image_ops.apply_ops``
step by step (``Policy.apply``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .image_ops import OP_ID, OPS, apply_ops, check_uint8

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019), as torchvision defines it: 25 sub-policies of
# two (op, probability, magnitude bin) steps; bin None for ops without a magnitude.
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

# Ops RandAugment and TrivialAugment-Wide choose from (torchvision's lists: no Invert).
RANDOM_OPS = OPS[:-1]


def magnitude_bins(name: str, num_bins: int, height: int, width: int, wide: bool = False) -> tuple[Tensor, bool]:
    """torchvision's magnitude scale of an op: (bins (num_bins,) float32, signed). ``wide`` gives
    TrivialAugment-Wide's ranges. Ops without a magnitude get zeros."""
    top = 0.99 if wide else 0.9
    if name in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.99 if wide else 0.3, num_bins), True
    if name in ("TranslateX", "TranslateY"):
        size = width if name == "TranslateX" else height
        return torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * size, num_bins), True
    if name == "Rotate":
        return torch.linspace(0.0, 135.0 if wide else 30.0, num_bins), True
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, top, num_bins), True
    if name == "Posterize":
        levels = 6 if wide else 4
        return (8 - (torch.arange(num_bins) / ((num_bins - 1) / levels)).round().int()).float(), False
    if name == "Solarize":
        return torch.linspace(1.0, 0.0, num_bins), False
    return torch.zeros(num_bins), False


@dataclass
class Policy:
    """An augmentation policy drawn per image.

    kind: "autoaugment" (CIFAR-10 policy), "randaugment" (``num_ops`` ops of magnitude bin
    ``magnitude`` of ``num_bins``) or "trivialaugment" (TrivialAugment-Wide: one op, a uniform bin).
    The magnitude tables are built on the host once per (device, image size) and cached; build them
    before capturing a CUDA graph by running one batch (graphs need warm-up runs anyway)."""

    kind: str = "autoaugment"  # "autoaugment" | "randaugment" | "trivialaugment"
    num_ops: int = 2  # randaugment: ops per image
    magnitude: int = 9  # randaugment: magnitude bin
    num_bins: int = 31  # randaugment / trivialaugment: magnitude bins (AutoAugment uses 10)

    def __post_init__(self) -> None:
        if self.kind not in ("autoaugment", "randaugment", "trivialaugment"):
            raise ValueError(f"kind must be autoaugment, randaugment or trivialaugment, got {self.kind!r}")
        if self.kind == "randaugment" and not 0 <= self.magnitude < self.num_bins:
            raise ValueError(f"magnitude must lie in [0, {self.num_bins}), got {self.magnitude}")
        self._cache: dict = {}

    @property
    def ops(self) -> tuple[str, ...]:
        if self.kind == "autoaugment":
            return tuple(sorted({s[0] for sub in CIFAR10_POLICY for s in sub}, key=OP_ID.get))
        return RANDOM_OPS

    def _tables(self, device: torch.device, height: int, width: int) -> dict[str, Tensor]:
        key = (str(device), height, width)
        if key in self._cache:
            return self._cache[key]
        if self.kind == "autoaugment":
            op, prob, mag, signed = [], [], [], []
            for sub in CIFAR10_POLICY:
                for name, p, b in sub:
                    bins, sgn = magnitude_bins(name, 10, height, width)
                    op.append(OP_ID[name])
                    prob.append(p)
                    mag.append(0.0 if b is None else float(bins[b]))
                    signed.append(sgn and b is not None)
            t = dict(
                op=torch.tensor(op).view(-1, 2),
                prob=torch.tensor(prob, dtype=torch.float32).view(-1, 2),
                mag=torch.tensor(mag, dtype=torch.float32).view(-1, 2),
                signed=torch.tensor(signed).view(-1, 2),
            )
        else:
            wide = self.kind == "trivialaugment"
            tables = [magnitude_bins(n, self.num_bins, height, width, wide) for n in RANDOM_OPS]
            t = dict(
                op=torch.tensor([OP_ID[n] for n in RANDOM_OPS]),
                mag=torch.stack([bins for bins, _ in tables]),  # (ops, num_bins)
                signed=torch.tensor([s for _, s in tables]),
            )
        self._cache[key] = t = {k: v.to(device) for k, v in t.items()}
        return t

    def draw(self, batch: int, height: int, width: int, generator: torch.Generator, device) -> tuple[Tensor, Tensor]:
        """Per-image op ids and signed magnitudes, each (steps, B)."""
        t = self._tables(torch.device(device), height, width)

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        if self.kind == "autoaugment":
            sub = torch.randint(len(CIFAR10_POLICY), (batch,), generator=generator, device=device)
            applied = rand(2, batch) < t["prob"][sub].T  # torchvision applies when rand <= p; same law
            op = torch.where(applied, t["op"][sub].T, OP_ID["Identity"])
            mag, signed = t["mag"][sub].T, t["signed"][sub].T
        else:
            steps = self.num_ops if self.kind == "randaugment" else 1
            which = torch.randint(len(RANDOM_OPS), (steps, batch), generator=generator, device=device)
            if self.kind == "randaugment":
                bin_ = torch.full_like(which, self.magnitude)
            else:
                bin_ = torch.randint(self.num_bins, (steps, batch), generator=generator, device=device)
            op, mag, signed = t["op"][which], t["mag"][which, bin_], t["signed"][which]
        negative = signed & (rand(*op.shape) < 0.5)
        return op, torch.where(negative, -mag, mag)

    def apply(self, images: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
        """Apply drawn (op, magnitude) tables (steps, B), as ``draw`` returns them, step by step."""
        check_uint8(images)
        if op.shape != magnitude.shape or op.ndim != 2 or op.shape[1] != images.shape[0]:
            raise ValueError(f"expected op and magnitude of shape (steps, {images.shape[0]}), got "
                             f"{tuple(op.shape)} and {tuple(magnitude.shape)}")
        for step in range(op.shape[0]):
            images = apply_ops(images, op[step], magnitude[step], self.ops)
        return images

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        check_uint8(images)
        B, _, H, W = images.shape
        return self.apply(images, *self.draw(B, H, W, generator, images.device))
