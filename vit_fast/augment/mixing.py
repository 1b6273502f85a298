"""Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) as DeiT uses them (timm's Mixup), sync-free,
with a batched device Beta sampler (``sample_betas``, from the Gamma sampler ``sample_gammas``), per
batch or per image: the draws (``draw_mix``, ``MixDraw``) apart from their application
(``apply_mix``), and both at once (``mix``); and the one-hot, label-smoothed targets they mix
(``smooth_targets``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _per_row(values: tuple[float, ...], device) -> float | Tensor:
    """Per-row constants of a batched sampler: the Python float itself when every row has the same
    value (no kernel), else an (S, 1, 1) float32 tensor built on the device by selects, since a
    ``torch.tensor`` of a list would copy host data at every call."""
    if len(set(values)) == 1:
        return values[0]
    rows = torch.arange(len(values), device=device).view(-1, 1, 1)
    out = torch.full((len(values), 1, 1), values[-1], device=device)
    for i, value in enumerate(values[:-1]):
        out = torch.where(rows == i, value, out)
    return out


def sample_gammas(shapes: tuple[float, ...], n: int, generator: torch.Generator, device,
                  proposals: int = 16) -> Tensor:
    """(S, n) float32 Gamma(shapes[s], 1) draws, row s of shape shapes[s], all rows in one set of
    kernels, without host syncs: Marsaglia & Tsang (2000) on shape + 1 with a fixed number of
    proposals per draw (the first accepted is kept; acceptance is >= 95% per proposal for
    shape + 1 >= 1, so all 16 fail with probability < 1e-20), then the boost
    Gamma(a) = Gamma(a + 1) * U^(1/a).

    Batched because mixup and cutmix need four Gamma draws per batch, and one sampler is ~25 tiny
    kernels whatever n is: the draws of a batch then cost one sampler's kernels, not four."""
    for shape in shapes:
        if shape <= 0:
            raise ValueError(f"gamma shape must be positive, got {shape}")
    S = len(shapes)
    d_values = tuple(shape + 1.0 - 1.0 / 3.0 for shape in shapes)
    d = _per_row(d_values, device)
    c = _per_row(tuple(1.0 / math.sqrt(9.0 * d_) for d_ in d_values), device)
    z = torch.randn(S, n, proposals, generator=generator, device=device)
    u = torch.rand(S, n, proposals, generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    v_positive = v.clamp_min(1e-30)
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v_positive))
    first = ok.int().argmax(dim=2, keepdim=True)  # the first accepted proposal (argmax: first max)
    g = v_positive.gather(2, first).squeeze(2) * (d if isinstance(d, float) else d.view(S, 1))
    boost = torch.rand(S, n, generator=generator, device=device).clamp_min(1e-30)
    if any(shape != 1.0 for shape in shapes):  # u ** 1 is u: a launch saved for Gamma(1) rows only
        exponent = _per_row(tuple(1.0 / shape for shape in shapes), device)
        boost = boost ** (exponent if isinstance(exponent, float) else exponent.view(S, 1))
    return g * boost


def sample_gamma(shape: float, n: int, generator: torch.Generator, device, proposals: int = 16) -> Tensor:
    """n Gamma(shape, 1) draws (n,) float32 (``sample_gammas`` with one row)."""
    return sample_gammas((shape,), n, generator, device, proposals)[0]


def sample_betas(alphas: tuple[float, ...], n: int, generator: torch.Generator, device) -> Tensor:
    """(S, n) float32 draws, row s from Beta(alphas[s], alphas[s]), as X / (X + Y) of two
    Gamma(alphas[s]) draws; every row's Gammas come from one batched sampler."""
    gammas = sample_gammas(alphas, 2 * n, generator, device)
    x, y = gammas[:, :n], gammas[:, n:]
    total = x + y
    return torch.where(total > 0, x / total.clamp_min(1e-30), 0.5)


def sample_beta(alpha: float, n: int, generator: torch.Generator, device) -> Tensor:
    """n Beta(alpha, alpha) draws (n,) float32 (``sample_betas`` with one row)."""
    return sample_betas((alpha,), n, generator, device)[0]


@dataclass
class MixDraw:
    """The draws of mixup / cutmix for a batch: n = 1 set of parameters ("batch" mode) or one per
    image ("elem"). Image i is mixed with its mirror B-1-i under parameters i (or the only set)."""

    use_cut: Tensor  # (n,) bool: cutmix rather than mixup
    lam_mix: Tensor  # (n,) float32: mixup's weight of the image itself
    y0: Tensor  # (n,) float32: cutmix's box, rows [y0, y1) and columns [x0, x1) taken from the partner
    y1: Tensor
    x0: Tensor
    x1: Tensor
    lam: Tensor  # (n,) float32: the targets' weight of the image itself (the pasted area corrected for cutmix)
    applied: Tensor | None  # (n,) bool: whether the image (batch) is mixed at all; None when always (prob 1)


def draw_mix(
    batch: int, height: int, width: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
    mode: str = "batch", generator: torch.Generator | None = None, device=None, prob: float = 1.0,
) -> MixDraw:  # fmt: skip
    """The draws of ``mix`` for a batch of ``batch`` images of height x width (see ``mix``)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError(f"mix needs mixup_alpha or cutmix_alpha > 0, got {mixup_alpha} and {cutmix_alpha}")
    if mode not in ("batch", "elem"):
        raise ValueError(f"mode must be 'batch' or 'elem', got {mode!r}")
    H, W, dev = height, width, device
    n = 1 if mode == "batch" else batch
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cut = rand(n) < switch_prob
    else:
        use_cut = torch.full((n,), cutmix_alpha > 0, device=dev)
    # Both lambdas in one batched sampler: row 0 mixup's, row 1 cutmix's (the ones present).
    alphas = tuple(a for a in (mixup_alpha, cutmix_alpha) if a > 0)
    lams = iter(sample_betas(alphas, n, generator, dev))
    lam_mix = next(lams) if mixup_alpha > 0 else torch.ones(n, device=dev)
    lam_cut = next(lams) if cutmix_alpha > 0 else torch.ones(n, device=dev)
    # The box (timm's rand_bbox): sides int(size * sqrt(1 - lam)), centre uniform on the pixels.
    cut = torch.sqrt(1.0 - lam_cut)
    half_h = ((H * cut).floor() / 2).floor()
    # A square image's half-sides are the same values: computed once (fewer tiny launches).
    half_w = half_h if W == H else ((W * cut).floor() / 2).floor()
    cy, cx = (rand(n) * H).floor(), (rand(n) * W).floor()
    y0, y1 = (cy - half_h).clamp(0, H), (cy + half_h).clamp(0, H)
    x0, x1 = (cx - half_w).clamp(0, W), (cx + half_w).clamp(0, W)
    lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    lam = torch.where(use_cut, lam_cut, lam_mix)  # (n,)
    applied = rand(n) < prob if prob < 1.0 else None
    return MixDraw(use_cut, lam_mix, y0, y1, x0, x1, lam, applied)


def apply_mix(images: Tensor, targets: Tensor, draw: MixDraw) -> tuple[Tensor, Tensor]:
    """Mix drawn parameters into ``images`` (B, C, H, W) float and ``targets`` (B, K) (see ``mix``)."""
    _, _, H, W = images.shape
    n, dev = draw.lam.shape[0], images.device
    rows = torch.arange(H, device=dev).view(1, H)
    cols = torch.arange(W, device=dev).view(1, W)
    in_box = ((rows >= draw.y0[:, None]) & (rows < draw.y1[:, None])).view(n, 1, H, 1) & (
        (cols >= draw.x0[:, None]) & (cols < draw.x1[:, None])
    ).view(n, 1, 1, W)
    partner = images.flip(0)
    lam_img = draw.lam_mix.view(n, 1, 1, 1)
    mixed = torch.where(
        draw.use_cut.view(n, 1, 1, 1),
        torch.where(in_box, partner, images),
        lam_img * images + (1.0 - lam_img) * partner,
    )
    lam_t = draw.lam.view(n, 1)
    mixed_targets = lam_t * targets + (1.0 - lam_t) * targets.flip(0)
    if draw.applied is not None:
        mixed = torch.where(draw.applied.view(n, 1, 1, 1), mixed, images)
        mixed_targets = torch.where(draw.applied.view(n, 1), mixed_targets, targets)
    return mixed, mixed_targets


def mix(
    images: Tensor, targets: Tensor, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
    mode: str = "batch", generator: torch.Generator | None = None, prob: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) as DeiT uses them (timm's Mixup), sync-free.

    ``images`` float (B, C, H, W), ``targets`` soft labels (B, K) (label smoothing already applied).
    Each image is mixed with its mirror in the batch (image B-1-i). With both alphas > 0, cutmix is
    chosen with probability ``switch_prob``. mode "batch": one choice, lam and box for the batch;
    "elem": one per image. CutMix's lam is corrected to the area actually pasted after clipping the
    box to the image. Both mixes are computed and selected with torch.where, so the ops do not
    depend on the draws. ``prob``: the probability that a batch ("batch") or an image ("elem") is
    mixed at all (timm's mix_prob); below 1 it is drawn after everything else, so that prob 1
    leaves the random stream as it was. ``draw_mix`` + ``apply_mix``."""
    B, _, H, W = images.shape
    draw = draw_mix(B, H, W, mixup_alpha, cutmix_alpha, switch_prob, mode, generator, images.device, prob)
    return apply_mix(images, targets, draw)


def smooth_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0, classes: Tensor | None = None) -> Tensor:
    """One-hot (B, K) float targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere
    (smoothing 0: the one-hot rows). ``classes``: arange(K) on the labels' device, when the caller
    keeps one (made here otherwise)."""
    # F.one_hot reads the labels' range back to the host; a comparison with arange does not.
    if classes is None:
        classes = torch.arange(num_classes, device=labels.device)
    hot = (labels.view(-1, 1) == classes).float()
    return hot * (1.0 - smoothing) + smoothing / num_classes if smoothing else hot
