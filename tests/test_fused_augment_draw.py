"""vit_fast::augment_draw (kernels/augment_draw.py under Triton's interpreter) against its torch twin
``vit_fast.augment.draws.counter_draws``, field by field, bit for bit; and the properties the
loader relies on: a draw is a function of (seed, epoch, step, image position), the same on every
rank, and its distributions are the recipe's."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch

from vit_fast.augment import draws as D
from vit_fast.augment.config import AugmentConfig
from vit_fast.augment.pipeline import policy_of
from vit_fast.fused.augment_draw import augment_draw

N = 300  # dataset images

CONFIGS = {
    "lee2021": AugmentConfig(policy="autoaugment", erase=0.25, erase_mode="const", mixup=1.0, cutmix=1.0),
    "deit_elem_pixel": AugmentConfig(policy="randaugment", erase=0.25, erase_mode="pixel", mixup=0.8, cutmix=1.0,
                                     mix_mode="elem", mix_prob=1.0),
    "trivial_rand_cutmix": AugmentConfig(policy="trivialaugment", erase=0.5, erase_mode="rand", cutmix=1.0,
                                         flip=False),
    "crop_only": AugmentConfig(crop_padding=2, flip=False),
}


def _setup(config: AugmentConfig, batch: int, rank: int = 0, world: int = 1, seed: int = 1234,
           size: int = 32, global_batch: int | None = None):
    policy = policy_of(config, "cpu", size, size)
    spec = D.draw_spec(config, policy, seed, batch, (3, size, size), rank, world, global_batch)
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(N, generator=g)
    labels = torch.randint(0, 100, (N,), generator=g)
    return spec, order, labels, D.policy_tables(policy, "cpu", size, size)


def _flat(result) -> dict:
    """Every output tensor of a draw by name (None where the step is off)."""
    index, labels, draws = result
    out = {"index": index, "labels": labels, "op": draws.op, "magnitude": draws.magnitude}
    for i, name in enumerate(("oy", "ox", "flipped")):
        out[name] = None if draws.crop is None else draws.crop[i]
    for part in ("erase", "mix"):
        value = getattr(draws, part)
        for f in fields(value) if value is not None else ():
            out[f"{part}.{f.name}"] = getattr(value, f.name)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_equals_the_torch_twin_bit_for_bit(name):
    """Every field at an awkward batch (37 of a global 80, rank 1 of 2) and step: identical bits,
    dtypes and shapes, including the values made through the series for ln, e**x, cos and sin."""
    spec, order, labels, tables = _setup(CONFIGS[name], 37, rank=1, world=2, global_batch=80)
    position = torch.tensor([3, 2])
    fused = _flat(augment_draw(spec, order, labels, position, tables))
    twin = _flat(D.counter_draws(spec, order, labels, position, tables))
    assert fused.keys() == twin.keys()
    for key in fused:
        a, b = fused[key], twin[key]
        if a is None or b is None:
            assert a is None and b is None, key
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), f"{key}: {(a != b).sum()} of {a.numel()} differ"


def test_soft_math_is_close_to_the_library_and_kernel_equal():
    """The series are accurate (a wrong coefficient shows here) and the kernel's are the twin's bits."""
    u = (torch.arange(1, 4097, dtype=torch.float32) * (1 / 4097.0)).float()
    # within 2 float32 ulps of the correctly rounded value
    torch.testing.assert_close(D.soft_log(u), torch.log(u.double()).float(), rtol=2.5e-7, atol=2e-7)
    x = torch.linspace(-20, 20, 4001)
    torch.testing.assert_close(D.soft_exp(x), torch.exp(x.double()).float(), rtol=4e-7, atol=0)
    cos, sin = D.cos_sin_turn(u)
    torch.testing.assert_close(cos, torch.cos(2 * math.pi * u.double()).float(), rtol=0, atol=5e-7)
    torch.testing.assert_close(sin, torch.sin(2 * math.pi * u.double()).float(), rtol=0, atol=5e-7)


def test_philox_known_answer():
    """Philox-4x32-10 of Random123's known-answer vector (counter and key all ones) and ours at zero."""
    ones = torch.tensor([0xFFFFFFFF])
    out = D.philox(ones, ones, ones, ones, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(w) for w in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    zero = torch.tensor([0])
    assert [int(w) for w in D.philox(zero, zero, zero, zero, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_draws_differ_by_step_epoch_and_seed():
    """Each word of the counter and the key reaches the draws (resume exactness is checked at the
    loader, tests/test_data.py)."""
    spec, order, labels, tables = _setup(CONFIGS["lee2021"], 16)
    at = lambda e, s, sp=spec: _flat(D.counter_draws(sp, order, labels, torch.tensor([e, s]), tables))  # noqa: E731
    first = at(2, 5)
    for other in (at(2, 6), at(3, 5), at(2, 5, replace(spec, seed=spec.seed + 1)),
                  at(2, 5, replace(spec, seed=spec.seed + (1 << 32)))):
        assert not torch.equal(first["oy"] * 9 + first["ox"], other["oy"] * 9 + other["ox"])


@pytest.mark.parametrize("seed,epoch,step", [(2**31 + 7, 2**31 + 3, 1), (3 * 2**32 + 5, 0, 4)])
def test_kernel_equals_the_twin_at_large_seeds_and_counters(seed, epoch, step):
    """Seed halves and counters past 2**31 (signed 32-bit arguments would change them)."""
    spec, order, labels, tables = _setup(CONFIGS["trivial_rand_cutmix"], 9, seed=seed)
    position = torch.tensor([epoch, step])
    fused = _flat(augment_draw(spec, order, labels, position, tables))
    twin = _flat(D.counter_draws(spec, order, labels, position, tables))
    for key, a in fused.items():
        assert (a is None and twin[key] is None) or torch.equal(a, twin[key]), key


@pytest.mark.gpu(reason="the draw kernel's CUDA arithmetic against its torch twin on the CPU needs a GPU")
@pytest.mark.parametrize("seed", [1234, 2**31 + 7, 3 * 2**32 + 5])
def test_kernel_on_cuda_equals_the_twin_on_the_cpu(seed):
    """Every field, every recipe, several positions, and a small Beta (mixup 0.1: tiny Gammas)."""
    configs = {**CONFIGS, "small_beta": AugmentConfig(mixup=0.1, cutmix=0.1, mix_mode="elem", mix_prob=1.0)}
    for name, config in configs.items():
        spec, order, labels, tables = _setup(config, 37, rank=1, world=2, seed=seed, global_batch=80)
        for epoch, step in ((0, 0), (3, 2), (2**31 + 1, 3)):
            position = torch.tensor([epoch, step])
            twin = _flat(D.counter_draws(spec, order, labels, position, tables))
            fused = _flat(augment_draw(spec, order.cuda(), labels.cuda(), position.cuda(),
                                       tuple(t.cuda() for t in tables)))
            for key, a in fused.items():
                assert (a is None and twin[key] is None) or torch.equal(a.cpu(), twin[key]), (name, epoch, step, key)


def test_stream_ranges_are_checked():
    with pytest.raises(ValueError, match="at most 31 policy steps per image, got 32"):
        D.draw_spec(AugmentConfig(policy="randaugment", randaugment_ops=32), policy_of(
            AugmentConfig(policy="randaugment", randaugment_ops=32)), 0, 4, (3, 8, 8))


def test_ranks_draw_the_global_batchs_rows():
    """Data parallel: rank r's image draws are rows r, r + W, ... of one process's global batch."""
    config = CONFIGS["deit_elem_pixel"]
    whole = _flat(D.counter_draws(*_setup(config, 12)[:3], torch.tensor([1, 3]), _setup(config, 12)[3]))
    for rank in range(3):
        spec, order, labels, tables = _setup(config, 4, rank=rank, world=3)
        part = _flat(D.counter_draws(spec, order, labels, torch.tensor([1, 3]), tables))
        for key in ("index", "labels", "oy", "ox", "flipped", "erase.top", "erase.height", "erase.on",
                    "erase.values"):
            assert torch.equal(part[key], whole[key][rank::3]), (rank, key)
        assert torch.equal(part["op"], whole["op"][:, rank::3]) and torch.equal(part["magnitude"],
                                                                                 whole["magnitude"][:, rank::3])


def test_distributions():
    """Over 4096 images: crop offsets cover [0, 2p], flips and signs near half, every erasing box
    inside the image and ~the asked share on, normals near N(0, 1), Beta(1, 1) weights uniform."""
    config = AugmentConfig(policy="autoaugment", erase=0.25, erase_mode="pixel", mixup=1.0, cutmix=1.0,
                           mix_mode="elem", mix_prob=1.0)
    spec, order, labels, tables = _setup(config, 4096)
    spec = replace(spec, height=8, width=8)  # small noise tensors
    index, _, d = D.counter_draws(spec, torch.arange(4096), torch.zeros(4096, dtype=torch.long),
                                  torch.tensor([0, 0]), tables)
    oy, ox, flipped = d.crop
    assert set(oy.unique().tolist()) == set(range(9)) == set(ox.unique().tolist())
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    e = d.erase
    assert abs(e.on.float().mean().item() - 0.25) < 0.03
    assert bool(((e.top + e.height <= 8) & (e.left + e.width <= 8) & (e.height >= 1)).all())
    assert abs(e.values.mean().item()) < 0.02 and abs(e.values.std().item() - 1) < 0.02
    lam = d.mix.lam_mix
    assert abs(lam.mean().item() - 0.5) < 0.02 and abs(lam.var().item() - 1 / 12) < 0.01  # Beta(1, 1) is U(0, 1)
    assert torch.equal(index, torch.arange(4096))


def test_bad_inputs_are_refused_with_the_value():
    spec, order, labels, tables = _setup(CONFIGS["crop_only"], 8)
    with pytest.raises(ValueError, match=r"position must be int64 \(2,\): \(epoch, step\), got torch.int64 \(3,\)"):
        augment_draw(spec, order, labels, torch.zeros(3, dtype=torch.long), tables)
    with pytest.raises(ValueError, match=r"order must be contiguous int64"):
        augment_draw(spec, order.int(), labels, torch.zeros(2, dtype=torch.long), tables)
    with pytest.raises(ValueError, match=r"mix_rows must be 0, 1 or the batch \(8\), got 3"):
        augment_draw(replace(spec, mix_rows=3), order, labels, torch.zeros(2, dtype=torch.long), tables)


def test_aot_compiles_without_spills():
    """The lee2021 draws of a vit-cifar batch with per-pixel noise (``aot_every_config``) compile
    for sm_80 and sm_90, without fma contraction and without spills."""
    from vit_fast.aot import TARGETS, compile_launches
    from vit_fast.fused import augment_draw as fused

    results = compile_launches(fused.aot_every_config())
    assert {r.capability for _, r in results} == set(TARGETS) and len(results) == 2 * len(TARGETS)
    for launch, r in results:
        assert launch.options == {"enable_fp_fusion": False}
        assert not r.spills and r.fits_shared_memory, f"{launch.describe()} sm_{r.capability}: {r}"
