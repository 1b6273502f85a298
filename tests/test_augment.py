"""Batched device augmentation (vit_fast.augment: image_ops, policies, erasing, mixing, pipeline)
against torchvision's per-image functional ops, its per-image randomness, determinism, absence of
host syncs, the samplers' statistics, and the pipeline's batch from its draws."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vit_fast import cost
from vit_fast.augment import erasing, image_ops, mixing, pipeline, policies
from vit_fast.augment.config import AugmentConfig
from vit_fast.syncs import OUTSIDE, count_host_syncs

NEAREST = InterpolationMode.NEAREST


def _images(n: int = 48, seed: int = 0) -> torch.Tensor:
    """Noise, smooth images (so that blurs and histograms are not trivial), and edge cases: a
    constant image, a low-range image, and one with a constant channel."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n // 2, 3, 32, 32), generator=g, dtype=torch.uint8)
    coarse = torch.rand(n // 2 - 3, 3, 4, 4, generator=g) * 255
    smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False).round().to(torch.uint8)
    constant = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    low = torch.randint(100, 103, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    flat_channel = noise[:1].clone()
    flat_channel[:, 1] = 200
    return torch.cat([noise, smooth, constant, low, flat_channel])


def _magnitudes(n: int, lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _torchvision_op(name: str, image: torch.Tensor, magnitude: float) -> torch.Tensor:
    """torchvision's AutoAugment step on one (1, C, H, W) image, magnitude in its convention."""
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(magnitude))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(
            image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=NEAREST, center=[0, 0]
        )
    if name in ("TranslateX", "TranslateY"):
        t = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(image, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST)
    if name == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=NEAREST)
    blends = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation,
              "Contrast": TF.adjust_contrast, "Sharpness": TF.adjust_sharpness}  # fmt: skip
    if name in blends:
        return blends[name](image, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(image, int(magnitude))
    if name == "Solarize":
        return TF.solarize(image, 255.0 * magnitude)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert}[name](image)


def _per_image(name: str, images: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    return torch.cat([_torchvision_op(name, images[i : i + 1], float(mags[i])) for i in range(len(images))])


# Blend ops agree within one level (float32 rounding of 1 - factor before truncation, see
# vit_fast.augment's colour section); all others exactly.
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")


def _assert_matches(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours.int() - ref.int()).abs()
    limit = 1 if name in BLENDS else 0
    assert diff.max() <= limit, f"{name}: max difference {int(diff.max())} levels, allowed {limit}"
    if name in BLENDS:  # off by one only where a value sits on a rounding edge: rare
        assert (diff > 0).float().mean() < 1e-3, f"{name}: {(diff > 0).float().mean():.2%} of values differ"


GEOMETRIC_RANGES = {"ShearX": 0.99, "ShearY": 0.99, "TranslateX": 32.0, "TranslateY": 32.0, "Rotate": 135.0}


@pytest.mark.parametrize("name", list(GEOMETRIC_RANGES))
def test_geometric_ops_match_torchvision_exactly(name):
    x = _images()
    top = GEOMETRIC_RANGES[name]
    mags = _magnitudes(len(x), -top, top)
    fn = {"ShearX": image_ops.shear_x, "ShearY": image_ops.shear_y, "TranslateX": image_ops.translate_x,
          "TranslateY": image_ops.translate_y, "Rotate": image_ops.rotate}[name]  # fmt: skip
    assert torch.equal(fn(x, mags), _per_image(name, x, mags))


@pytest.mark.parametrize("size", [(28, 24), (33, 17)])
def test_geometric_ops_exact_on_other_sizes(size):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (12, 3, *size), generator=g, dtype=torch.uint8)
    mags = _magnitudes(12, -1.0, 1.0)
    assert torch.equal(image_ops.rotate(x, mags * 135), _per_image("Rotate", x, mags * 135))
    assert torch.equal(image_ops.shear_y(x, mags), _per_image("ShearY", x, mags))
    assert torch.equal(image_ops.translate_x(x, mags * 20), _per_image("TranslateX", x, mags * 20))


@pytest.mark.parametrize("name", BLENDS)
def test_blend_ops_match_torchvision(name):
    x = _images()
    mags = _magnitudes(len(x), -0.99, 0.99)
    fn = {"Brightness": image_ops.brightness, "Color": image_ops.color, "Contrast": image_ops.contrast, "Sharpness": image_ops.sharpness}[name]
    _assert_matches(name, fn(x, 1.0 + mags.double()), _per_image(name, x, mags))


def test_posterize_solarize_match_torchvision_exactly():
    x = _images()
    bits = torch.arange(len(x)) % 9  # every bit count 0..8
    assert torch.equal(image_ops.posterize(x, bits.float()), _per_image("Posterize", x, bits.float()))
    # Thresholds from the magnitude bins (float32, as torchvision stores them): 255 * (1/3) must
    # round in float32 as torchvision's comparison rounds it.
    bins = torch.linspace(1.0, 0.0, 10)
    mags = bins[torch.arange(len(x)) % 10]
    assert torch.equal(image_ops.solarize(x, 255.0 * mags.double()), _per_image("Solarize", x, mags))


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert"])
def test_parameterless_ops_match_torchvision_exactly(name):
    x = _images()
    fn = {"AutoContrast": image_ops.autocontrast, "Equalize": image_ops.equalize, "Invert": image_ops.invert}[name]
    assert torch.equal(fn(x), _per_image(name, x, torch.zeros(len(x))))


def test_apply_ops_selects_each_images_own_op():
    """Every image of the batch gets its own op and magnitude; compared with torchvision per image."""
    x = _images(60)
    B = len(x)
    g = torch.Generator().manual_seed(3)
    op = torch.arange(B) % len(image_ops.OPS)  # every op several times
    mags = torch.rand(B, generator=g) * 2 - 1
    scaled = {"TranslateX": 14.0, "TranslateY": 14.0, "Rotate": 30.0, "Posterize": 4.0, "Solarize": 0.5}
    mags = torch.stack([mags[i] * scaled.get(image_ops.OPS[op[i]], 1.0) for i in range(B)])
    mags = torch.where(op == image_ops.OP_ID["Posterize"], mags.abs() + 4, mags)
    mags = torch.where(op == image_ops.OP_ID["Solarize"], mags.abs() + 0.5, mags)
    ours = image_ops.apply_ops(x, op, mags)
    for i in range(B):
        name = image_ops.OPS[op[i]]
        _assert_matches(name, ours[i : i + 1], _torchvision_op(name, x[i : i + 1], float(mags[i])))


def test_policy_tables_match_torchvision():
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    assert tuple(tuple(tuple(s) for s in sub) for sub in tv._policies) == policies.CIFAR10_POLICY
    cases = [(v2.AutoAugment(), 10, False), (v2.RandAugment(), 31, False), (v2.TrivialAugmentWide(), 31, True)]
    for t, bins, wide in cases:
        for name, (fn, signed) in t._AUGMENTATION_SPACE.items():
            ref = fn(bins, 32, 28)
            ours, our_signed = policies.magnitude_bins(name, bins, 32, 28, wide)
            assert our_signed == signed, f"{type(t).__name__} {name}: signed {our_signed}, expected {signed}"
            if ref is not None and ref.ndim:
                assert torch.equal(ours, ref.float()), f"{type(t).__name__} {name}: {ours} != {ref}"
        if not isinstance(t, v2.AutoAugment):
            assert tuple(t._AUGMENTATION_SPACE) == policies.RANDOM_OPS


POLICIES = ["autoaugment", "randaugment", "trivialaugment"]


@pytest.mark.parametrize("kind", POLICIES)
def test_policy_draws_per_image_and_repeats_with_the_seed(kind):
    policy = policies.Policy(kind)
    x = _images(32)[:1].expand(32, -1, -1, -1).contiguous()  # one image, 32 times
    op, mag = policy.draw(32, 32, 32, torch.Generator().manual_seed(0), "cpu")
    assert len({(tuple(op[:, i].tolist()), tuple(mag[:, i].tolist())) for i in range(32)}) > 8
    a = policy(x, torch.Generator().manual_seed(5))
    b = policy(x, torch.Generator().manual_seed(5))
    c = policy(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({bytes(a[i].flatten().numpy()) for i in range(32)}) > 4, "copies of one image came out alike"


def test_autoaugment_draw_frequencies():
    """Each step's op appears with its sub-policy's probability (1/25 times p), magnitudes signed
    half of the time for signed ops."""
    n = 100_000
    op, mag = policies.Policy("autoaugment").draw(n, 32, 32, torch.Generator().manual_seed(0), "cpu")
    expected = Counter()
    for sub in policies.CIFAR10_POLICY:
        for name, p, _ in sub:
            expected[name] += p / len(policies.CIFAR10_POLICY) / 2
    counts = Counter(image_ops.OPS[i] for i in op.flatten().tolist())
    for name, p in expected.items():
        freq, se = counts[name] / (2 * n), math.sqrt(p * (1 - p) / (2 * n))
        assert abs(freq - p) < 5 * se, f"{name}: frequency {freq:.4f}, expected {p:.4f} (se {se:.4f})"
    rotate = mag[op == image_ops.OP_ID["Rotate"]]
    assert abs((rotate < 0).float().mean() - 0.5) < 0.05


def test_random_erasing_boxes():
    B, H, W = 4000, 32, 32
    g = torch.Generator().manual_seed(0)
    mask = erasing.erase_boxes(B, H, W, 0.25, g, "cpu")[:, 0]  # (B, H, W)
    erased = mask.flatten(1).any(1)
    p, se = 0.25, math.sqrt(0.25 * 0.75 / B)
    assert abs(erased.float().mean() - p) < 5 * se
    for m in mask[erased][:200]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w, "erased region is not one rectangle"
        assert m.sum() == h * w and h < H and w < W
        assert 0.02 * H * W * 0.5 < h * w < (H * W / 3) * 1.5 + 2 * (h + w)  # area fraction in scale, up to rounding


def test_random_erasing_boxes_reach_every_edge_uniformly():
    """Kills the mutation of ``draw_erase_boxes`` drawing the box top from ``height - h`` (or the
    left from ``width - w``) instead of ``height + 1 - h`` / ``width + 1 - w``: boxes would never
    touch the bottom (right) edge. A box of h rows has H + 1 - h places, each drawn with
    probability 1 / (H + 1 - h); so given the drawn sizes, the number of boxes at the top edge
    (top == 0) and at the bottom edge (top + h == H) are sums of independent Bernoulli draws of
    known mean and variance (the same for columns). 20,000 boxes on 32 x 32: about 1,280 expected
    at each edge, with a standard deviation of about 34; the bound is 6 of those (a false failure
    has a chance under 1e-8, and the seed is fixed), the mutation gives 0 at the bottom (right)."""
    B, H, W = 20_000, 32, 32
    top, left, h, w, on = erasing.draw_erase_boxes(B, H, W, 1.0, torch.Generator().manual_seed(0), "cpu")
    on = on[:, 0]
    assert on.float().mean() > 0.99  # nearly every image has a fitting try
    top, left, h, w = top[on, 0], left[on, 0], h[on, 0], w[on, 0]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (top == top.floor()).all() and (left == left.floor()).all()
    for edge, at_edge, places in [("top", top == 0, H + 1 - h), ("bottom", top + h == H, H + 1 - h),
                                  ("left", left == 0, W + 1 - w), ("right", left + w == W, W + 1 - w)]:
        p = 1 / places  # each box's chance of this edge, given its size
        expected, sd = float(p.sum()), float((p * (1 - p)).sum().sqrt())
        count = int(at_edge.sum())
        assert expected > 1000 and abs(count - expected) < 6 * sd, \
            f"{count} of {len(p)} boxes at the {edge} edge, expected {expected:.0f} +- {sd:.0f}"
    # The masks of the same draws erase the last row / column of exactly those images.
    mask = erasing.erase_boxes(B, H, W, 1.0, torch.Generator().manual_seed(0), "cpu")[:, 0]  # (B, H, W)
    assert int(mask[:, -1, :].any(-1).sum()) == int((top + h == H).sum())
    assert int(mask[:, :, -1].any(-1).sum()) == int((left + w == W).sum())


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_values(mode):
    x = torch.randn(64, 3, 16, 16)
    out = erasing.random_erasing(x, torch.Generator().manual_seed(1), p=1.0, mode=mode)
    changed = (out != x).any(1)  # (B, H, W)
    assert changed.flatten(1).any(1).float().mean() > 0.9
    assert torch.equal(out, erasing.random_erasing(x, torch.Generator().manual_seed(1), p=1.0, mode=mode))
    if mode == "const":
        assert (out[changed.unsqueeze(1).expand_as(out)] == 0).all()
    u8 = _images(8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])
    erased = erasing.random_erasing(u8, torch.Generator().manual_seed(1), 1.0, mode, mean, std)
    assert erased.dtype == torch.uint8 and (erased != u8).any()
    with pytest.raises(ValueError, match="mean and std"):
        erasing.random_erasing(u8, torch.Generator(), 1.0, mode)


def _beta_rows(alpha: float, n: int) -> list[tuple[float, torch.Tensor]]:
    """Beta(alpha, alpha) draws from the one-row sampler and from a batched row beside rows of
    other shapes (the batched sampler's per-row constants must follow their row)."""
    g = torch.Generator().manual_seed(0)
    alone = mixing.sample_beta(alpha, n, g, "cpu")
    batched = mixing.sample_betas((0.3, alpha, 5.0), n, g, "cpu")
    return [(alpha, alone), (0.3, batched[0]), (alpha, batched[1]), (5.0, batched[2])]


@pytest.mark.parametrize("alpha", [0.8, 1.0, 2.0])
@pytest.mark.parametrize("row", range(4), ids=["alone", "batched-0.3", "batched", "batched-5.0"])
def test_beta_sampler_mean_and_variance(alpha, row):
    n = 200_000
    alpha, lam = _beta_rows(alpha, n)[row]
    lam = lam.double()
    assert ((lam >= 0) & (lam <= 1)).all()
    mean, var = 0.5, 1.0 / (4 * (2 * alpha + 1))  # Beta(a, a)
    se_mean = math.sqrt(var / n)
    centred = lam - lam.mean()
    se_var = math.sqrt(((centred**4).mean() - centred.var() ** 2) / n)
    assert abs(lam.mean() - mean) < 4 * se_mean, f"mean {lam.mean():.5f}, expected {mean} (se {se_mean:.5f})"
    assert abs(lam.var() - var) < 4 * se_var, f"variance {lam.var():.5f}, expected {var:.5f} (se {se_var:.5f})"


def _mix_inputs(B: int = 16, K: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 8, 8, generator=g) + torch.arange(B).view(B, 1, 1, 1) * 10  # images told apart by value
    labels = torch.arange(B) % K
    return x, mixing.smooth_targets(labels, K, 0.0)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_lam_is_the_pasted_area(mode):
    x, t = _mix_inputs()
    for seed in range(5):
        out, soft = mixing.mix(x, t, 0.0, 1.0, 0.5, mode, torch.Generator().manual_seed(seed))
        own = (out == x).flatten(1).float().mean(1)  # fraction of each image left as it was
        assert ((out == x) | (out == x.flip(0))).all()
        lam = soft[torch.arange(len(x)), torch.arange(len(x)) % 10]
        pair = (torch.arange(len(x)) % 10) == (torch.arange(len(x)).flip(0) % 10)
        torch.testing.assert_close(lam[~pair], own[~pair])
        if mode == "batch":
            assert torch.allclose(own, own[0])
    lams = {mixing.mix(x, t, 0.0, 1.0, 0.5, "elem", torch.Generator().manual_seed(0))[1][i].max().item() for i in range(16)}
    assert len(lams) > 1, "elem mode gave every image the same lam"


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixup_blends_with_the_mirror_image(mode):
    x, t = _mix_inputs()
    out, soft = mixing.mix(x, t, 0.8, 0.0, 0.5, mode, torch.Generator().manual_seed(2))
    lam = soft[torch.arange(16), torch.arange(16) % 10].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(soft.sum(1), torch.ones(16))


def test_mix_switches_between_mixup_and_cutmix():
    x, t = _mix_inputs()
    kinds = Counter()
    for seed in range(200):
        out, _ = mixing.mix(x, t, 0.8, 1.0, 0.5, "batch", torch.Generator().manual_seed(seed))
        kinds["cut" if ((out == x) | (out == x.flip(0))).all() else "mix"] += 1
    assert 60 < kinds["cut"] < 140, kinds


def test_smooth_targets():
    t = mixing.smooth_targets(torch.tensor([0, 2]), 4, 0.1)
    torch.testing.assert_close(t, torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]]))


# DeiT's augmentation (Touvron et al. 2021) and label smoothing, normalised with these statistics:
# the training batches of the pipeline tests below, built as DeviceLoader builds them.
DEIT = AugmentConfig(crop_padding=4, flip=True, policy="autoaugment", erase=0.25, erase_max_area=1 / 3,
                     erase_mode="pixel", mixup=0.8, cutmix=1.0, mix_prob=1.0, mix_switch_prob=0.5, mix_mode="batch")
SMOOTHING = 0.1
MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.full((3,), 0.25)
CLASSES = torch.arange(10)


def _pipeline(mode: str = "batch", kind: str = "autoaugment", **changes):
    """(config, policy) as the loader holds them: the policy is built once, so its magnitude tables
    reach the device at the first batch only."""
    config = dataclasses.replace(DEIT, policy=kind, mix_mode=mode, **changes)
    return config, pipeline.policy_of(config)


def _batch(pipe, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator, fused: bool = False):
    """The training batch of ``images`` (normalised float32, smoothed and mixed targets): draw_batch,
    then build_batch, as DeviceLoader calls them."""
    config, policy = pipe
    draws = pipeline.draw_batch(config, policy, images.shape, g, images.device)
    index = torch.arange(images.shape[0])
    return pipeline.build_batch(images, index, labels, draws, config, policy, MEAN, STD, CLASSES, SMOOTHING,
                                fused=fused)


def _augmented_uint8(pipe, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Crop, flip, the policy and random erasing on the uint8 batch (erasing mapped to intensity
    levels, see ``random_erasing``): the batch up to normalisation, as an image."""
    config, policy = pipe
    draws = pipeline.draw_batch(config, policy, images.shape, g, images.device, mix=False)
    images = pipeline.apply_geometry_and_policy(images, draws, config.crop_padding, policy)
    return images if draws.erase is None else erasing.apply_erasing(images, draws.erase, MEAN, STD)


def test_pipeline_shapes_and_determinism():
    x, labels = _images(16), torch.arange(16) % 10
    pipe = _pipeline()
    out, soft = _batch(pipe, x, labels, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and soft.shape == (16, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    out2, soft2 = _batch(pipe, x, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, out2) and torch.equal(soft, soft2)
    u8 = _augmented_uint8(pipe, x, torch.Generator().manual_seed(0))
    assert u8.dtype == torch.uint8 and u8.shape == x.shape
    assert torch.equal(u8, _augmented_uint8(pipe, x, torch.Generator().manual_seed(0)))


# Built once: a policy's magnitude tables reach the device on its first call (a warm-up call, as
# CUDA-graph capture needs anyway), so the checked second call must reuse the same objects.
_POLICY_OBJECTS = {kind: policies.Policy(kind) for kind in POLICIES}
_PIPELINES = {"elem": _pipeline("elem"), "batch": _pipeline("batch", "trivialaugment")}
SYNC_CASES = {
    **{kind: _POLICY_OBJECTS[kind] for kind in POLICIES},
    "erasing_uint8": lambda x, g: erasing.random_erasing(x, g, 0.5, "pixel", torch.full((3,), 0.5), torch.full((3,), 0.2)),
    "erasing_float": lambda x, g: erasing.random_erasing(x.float(), g, 0.5, "pixel"),
    "mix_batch": lambda x, g: mixing.mix(x.float(), torch.rand(len(x), 10), 0.8, 1.0, 0.5, "batch", g),
    "mix_elem": lambda x, g: mixing.mix(x.float(), torch.rand(len(x), 10), 0.8, 1.0, 0.5, "elem", g),
    "pipeline": lambda x, g: _batch(_PIPELINES["elem"], x, torch.arange(len(x)) % 10, g),
    "pipeline_uint8": lambda x, g: _augmented_uint8(_PIPELINES["batch"], x, g),
}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_no_host_syncs(case):
    fn, x = SYNC_CASES[case], _images(8)
    fn(x, torch.Generator().manual_seed(0))  # first call builds the cached tables
    account = cost.CostAccount()  # the kernels run: the check saw the work
    with count_host_syncs() as counter, cost.CostRecorder(account):
        fn(x, torch.Generator().manual_seed(0))
    counter.assert_sync_free()
    assert account.launches > 10


def test_sync_counter_catches_the_syncs_a_batch_must_not_make():
    """The counter the checks above use (vit_fast.syncs) sees scalar reads, Python-level reads of
    values and tensors made from host data; boolean-mask indexing is data-dependent (flagged, or at
    least seen as an operator)."""
    x = torch.ones(3)
    account = cost.CostAccount()
    with count_host_syncs() as counter, cost.CostRecorder(account):
        x.sum().item()
        x.tolist()
        bool(x[0] > 0)
        torch.tensor([1.0, 2.0])
        x[x > 0]
    counts, seen = counter.counts[OUTSIDE], {event.what for event in counter.events}
    assert counts.local_scalar_dense >= 2  # item, bool
    assert {"Tensor.item", "Tensor.tolist", "Tensor.__bool__"} <= seen
    assert counts.host_data >= 1 and "aten.lift_fresh" in seen
    assert counts.data_dependent or "aten::index" in account.ops
    with pytest.raises(AssertionError, match="host sync"):
        counter.assert_sync_free()


def _one_call_pipeline(pipe, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator):
    """DeiT's order written with the one-call functions (each draws, then applies)."""
    c, policy = pipe
    x = pipeline.random_crop_flip(images, c.crop_padding, c.flip, g)
    x = pipeline.normalize(policy(x, g) if policy is not None else x, MEAN, STD)
    x = erasing.random_erasing(x, g, c.erase, c.erase_mode, scale=(0.02, c.erase_max_area))
    targets = mixing.smooth_targets(labels, len(CLASSES), SMOOTHING)
    return mixing.mix(x, targets, c.mixup, c.cutmix, c.mix_switch_prob, c.mix_mode, g, c.mix_prob)


@pytest.mark.parametrize("kind", POLICIES)
def test_draw_then_apply_equals_the_one_call_path(kind):
    """Drawing first and applying after gives the one-call functions' results and leaves the
    generator where they leave it: the policy, erasing, mixing, and the loader's whole batch
    (draw_batch, then build_batch)."""
    x, labels = _images(12), torch.arange(12) % 10
    policy = policies.Policy(kind)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(policy(x, g1), policy.apply(x, *policy.draw(12, 32, 32, g2, "cpu")))
    xf = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    erased = erasing.apply_erasing(xf, erasing.draw_erasing(xf.shape, g2, "cpu", 0.5, "rand", scale=(0.02, 0.4)))
    assert torch.equal(erasing.random_erasing(xf, g1, 0.5, "rand", scale=(0.02, 0.4)), erased)
    t = mixing.smooth_targets(labels, 10, 0.1)
    mixed = mixing.apply_mix(xf, t, mixing.draw_mix(12, 32, 32, 0.8, 1.0, 0.5, "elem", g2, "cpu", 0.5))
    for ours, ref in zip(mixed, mixing.mix(xf, t, 0.8, 1.0, 0.5, "elem", g1, 0.5)):
        assert torch.equal(ours, ref)
    assert torch.equal(g1.get_state(), g2.get_state())
    pipe = _pipeline(kind=kind, mix_prob=0.7)
    for seed in range(3):
        batch = _batch(pipe, x, labels, torch.Generator().manual_seed(seed))
        for ours, ref in zip(batch, _one_call_pipeline(pipe, x, labels, torch.Generator().manual_seed(seed))):
            assert torch.equal(ours, ref)


def test_fused_build_batch_builds_the_same_batch():
    """build_batch(fused=True): the same draws, the fused kernels (augment_policy, then
    vit_fast::augment_finish), the same smoothed and mixed batch."""
    x, labels = _images(10), torch.arange(10) % 10
    for mode, erase_mode in (("batch", "const"), ("elem", "pixel")):
        pipe = _pipeline(mode, erase_mode=erase_mode, erase=0.5, mix_prob=0.6)
        for seed in range(2):
            ref = _batch(pipe, x, labels, torch.Generator().manual_seed(seed))
            out = _batch(pipe, x, labels, torch.Generator().manual_seed(seed), fused=True)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
