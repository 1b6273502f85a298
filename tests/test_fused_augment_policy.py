"""vit_fast::augment_policy against the torch implementation (pipeline.apply_crop_flip, then
image_ops.apply_ops per step): bit-identical uint8 per op, for edge magnitudes of both signs, for
whole policies and for crop/flip alone, on square and non-square shapes; bad inputs; no host
syncs; one launch in the cost account; the ahead-of-time compile without spills.

The reference always runs on the CPU (torch's CPU kernels are the arithmetic the kernel copies:
on CUDA, torch's bmm may sum the sampling grid in another order); the kernel runs on ``device``
(CUDA when present, else the CPU under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vit_fast.augment import image_ops, policies
from vit_fast.augment.pipeline import apply_crop_flip, crop_flip_offsets
from vit_fast.fused import augment_policy as fused
from vit_fast.fused.augment_policy import augment_policy

SHAPES = [(32, 32), (20, 28)]  # CIFAR's, and non-square with no power-of-two side
DATASET = 24  # images in the test datasets


def _dataset(height: int, width: int, channels: int = 3, n: int = DATASET, seed: int = 0) -> torch.Tensor:
    """Random uint8 images, with a few that exercise the reductions: a constant image, one with a
    constant channel, a two-level image and a low-contrast one."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, height, width), generator=g, dtype=torch.uint8)
    images[1] = 77
    images[2, 0] = 200
    images[3] = torch.where(torch.rand(channels, height, width, generator=g) < 0.5, 10, 250).to(torch.uint8)
    images[4] = torch.randint(100, 104, (channels, height, width), generator=g, dtype=torch.uint8)
    return images


def _offsets(batch: int, padding: int, flip: bool, seed: int = 1):
    return crop_flip_offsets(batch, padding, flip, torch.Generator().manual_seed(seed), "cpu")


def _reference(images, index, padding, oy, ox, flipped, op, magnitude) -> torch.Tensor:
    x = apply_crop_flip(images[index], padding, oy, ox, flipped)
    for step in range(op.shape[0]):
        x = image_ops.apply_ops(x, op[step], magnitude[step])
    return x


def _assert_matches(images, index, padding, oy, ox, flipped, op, magnitude, device) -> torch.Tensor:
    """Run the kernel on ``device`` and compare it with the CPU reference, value for value."""
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = augment_policy(to(images), to(index), padding, to(oy), to(ox), to(flipped), to(op), to(magnitude))
    ref = _reference(images, index, padding, oy, ox, flipped, op, magnitude)
    assert out.dtype == torch.uint8 and out.shape == ref.shape, (out.dtype, tuple(out.shape), tuple(ref.shape))
    differ = out.cpu() != ref
    if differ.any():
        b, c, y, x = (int(i) for i in differ.nonzero()[0])
        pytest.fail(f"{int(differ.sum())} of {ref.numel()} values differ; first at image {b} (op "
                    f"{op[:, b].tolist()}, magnitude {magnitude[:, b].tolist()}) channel {c} pixel ({y}, {x}): "
                    f"kernel {int(out[b, c, y, x])}, torch {int(ref[b, c, y, x])}")
    return out


# Per op: 16 magnitudes, both signs and the edges (factor 0 and 2 for the blends, posterize bits
# 0 and 8 and beyond, solarize thresholds 0 and 1 and beyond, the policies' bins).
_BLEND = [-1.0, -0.99, -0.9, -0.5, -0.3, -0.1, -0.0333, 0.0, 0.0333, 0.1, 0.3, 0.5, 0.6, 0.9, 0.99, 1.0]
MAGNITUDES = {
    "Identity": [0.0] * 8 + [1.0] * 8,
    "ShearX": [-0.99, -0.7, -0.5, -0.3, -0.1, -0.0333, 0.0, 0.0333, 0.1, 0.2, 0.3, 0.45, 0.5, 0.66, 0.9, 0.99],
    "TranslateX": [-32.0, -14.5, -9.9, -4.35, -2.7, -1.0, -0.5, 0.0, 0.5, 1.0, 2.7, 4.35, 9.9, 14.5, 31.0, 40.0],
    "Rotate": [-180.0, -135.0, -90.0, -45.0, -30.0, -10.0, -3.33, 0.0, 3.33, 10.0, 30.0, 45.0, 60.0, 90.0, 135.0,
               180.0],
    "Brightness": _BLEND, "Color": _BLEND, "Contrast": _BLEND, "Sharpness": _BLEND,
    "Posterize": [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 4.9, 5.0, 6.0, 7.0, 7.99, 8.0, 8.5, 9.0, -1.0, -0.5],
    "Solarize": [0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 0.9, 1 / 255, 254 / 255, 128 / 255, 1 / 3, 2 / 3, 1.5, -0.5, 0.01,
                 0.99],
    "AutoContrast": [0.0] * 16, "Equalize": [0.0] * 16, "Invert": [0.0] * 16,
}  # fmt: skip
MAGNITUDES["ShearY"] = MAGNITUDES["ShearX"]
MAGNITUDES["TranslateY"] = MAGNITUDES["TranslateX"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", image_ops.OPS)
def test_each_op_matches_torch(name, shape, device):
    """Every op on 16 images, one magnitude each, after a crop and flip (padding 4)."""
    images = _dataset(*shape)
    batch = 16
    index = torch.arange(batch) % DATASET
    magnitude = torch.tensor(MAGNITUDES[name], dtype=torch.float32).view(1, batch)
    op = torch.full((1, batch), image_ops.OP_ID[name])
    _assert_matches(images, index, 4, *_offsets(batch, 4, True), op, magnitude, device)


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Sharpness", "Contrast", "Color"])
def test_reductions_on_edge_images(name, device):
    """No crop (padding 0, no flip), so the constant, constant-channel, two-level and low-contrast
    images reach the op as they are: autocontrast's flat channels, equalize's step 0 (fewer than
    255 pixels off the top level) and its single-level channels."""
    images = _dataset(20, 28)
    step_zero = torch.full((3, 20, 28), 250, dtype=torch.uint8)
    step_zero[:, :7] = torch.arange(196, dtype=torch.uint8).view(7, 28)  # 196 of 560 pixels below the top level
    images[5] = step_zero
    batch = 8
    index = torch.arange(batch)
    oy = ox = torch.zeros(batch, 1, dtype=torch.long)
    op = torch.full((1, batch), image_ops.OP_ID[name])
    magnitude = torch.linspace(-0.9, 0.9, batch).view(1, batch)
    out = _assert_matches(images, index, 0, oy, ox, None, op, magnitude, device)
    if name == "Equalize":  # the step-0 image is kept as it is, and so is the constant one
        assert torch.equal(out[5].cpu(), step_zero) and torch.equal(out[1].cpu(), images[1])


# 64x64 (vit-64's images): four of the kernel's 1024-pixel blocks per image, where 32x32 fills one.
@pytest.mark.parametrize("shape", [*SHAPES, (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["autoaugment", "randaugment", "trivialaugment"])
def test_whole_policies_match_torch(kind, shape, device):
    """The policies' own draws (Policy.draw: every op, bin and sign they can produce), two steps
    for AutoAugment and RandAugment, one for TrivialAugment-Wide, 32 images."""
    images = _dataset(*shape)
    batch = 32
    g = torch.Generator().manual_seed(7)
    index = torch.randint(0, DATASET, (batch,), generator=g)
    op, magnitude = policies.Policy(kind).draw(batch, *shape, g, "cpu")
    assert op.shape == magnitude.shape == ((1 if kind == "trivialaugment" else 2), batch)
    _assert_matches(images, index, 4, *_offsets(batch, 4, True, seed=3), op, magnitude, device)


def test_every_geometric_bin_of_every_policy(device):
    """The inverse affine matrix is computed in the kernel with its own float64 sin, cos and atan,
    which may differ from torch's in the last float64 bits: at every magnitude the policies can
    draw for 32 x 32 images (AutoAugment's 10 bins, RandAugment's and TrivialAugment-Wide's 31),
    the float32 matrices and so the pixels agree. Each image runs the bin's magnitude, then its
    negative."""
    op, magnitude = [], []
    for name in image_ops.GEOMETRIC:
        for num_bins, wide in ((10, False), (31, False), (31, True)):
            bins, _ = policies.magnitude_bins(name, num_bins, 32, 32, wide)
            op.append(torch.full((2, num_bins), image_ops.OP_ID[name]))
            magnitude.append(torch.stack([bins, -bins]))
    op, magnitude = torch.cat(op, dim=1), torch.cat(magnitude, dim=1)
    batch = op.shape[1]
    index = torch.arange(batch) % DATASET
    _assert_matches(_dataset(32, 32), index, 4, *_offsets(batch, 4, True, seed=9), op, magnitude, device)


def test_policy_sequences_of_every_op_pair(device):
    """Two steps where the first op's output feeds the second: each op followed by each other."""
    images = _dataset(32, 32)
    first = torch.arange(len(image_ops.OPS)).repeat_interleave(len(image_ops.OPS))
    second = torch.arange(len(image_ops.OPS)).repeat(len(image_ops.OPS))
    batch = first.numel()
    g = torch.Generator().manual_seed(11)
    op = torch.stack([first, second])
    magnitude = torch.stack([torch.rand(batch, generator=g) * 0.9, -torch.rand(batch, generator=g) * 0.9])
    magnitude[:, (op[0] == image_ops.OP_ID["Rotate"]) | (op[1] == image_ops.OP_ID["Rotate"])] *= 30
    index = torch.arange(batch) % DATASET
    _assert_matches(images, index, 4, *_offsets(batch, 4, True, seed=5), op, magnitude, device)


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize(("padding", "flip"), [(0, False), (4, True), (2, False), (0, True)])
def test_crop_and_flip_only(batch, padding, flip, device):
    """No policy step (op of shape (0, B)): the gather of pipeline.apply_crop_flip alone."""
    images = _dataset(20, 28)
    index = torch.randint(0, DATASET, (batch,), generator=torch.Generator().manual_seed(batch))
    op, magnitude = torch.zeros(0, batch, dtype=torch.long), torch.zeros(0, batch)
    _assert_matches(images, index, padding, *_offsets(batch, padding, flip), op, magnitude, device)


def test_offsets_as_vectors_and_any_channel_count_without_steps(device):
    """(B,) offsets and flips work as (B, 1) do; with no step, one channel is fine."""
    images = _dataset(20, 28, channels=1)
    batch = 5
    oy, ox, flipped = _offsets(batch, 3, True)
    index = torch.arange(batch)
    op, magnitude = torch.zeros(0, batch, dtype=torch.long), torch.zeros(0, batch)
    out = augment_policy(images.to(device), index.to(device), 3, oy.view(-1).to(device), ox.view(-1).to(device),
                         flipped.view(-1).to(device), op.to(device), magnitude.to(device))
    assert torch.equal(out.cpu(), apply_crop_flip(images[index], 3, oy, ox, flipped))


def test_out_of_range_ids_and_indices_are_defined(device):
    """What cannot be checked without a host sync is defined: an op id outside OPS leaves the
    image as it is; an index outside the dataset gives a black image (nothing outside is read)."""
    images = _dataset(20, 28)
    batch = 4
    index = torch.tensor([0, DATASET, -1, 2])
    oy = ox = torch.zeros(batch, 1, dtype=torch.long)
    op = torch.tensor([[len(image_ops.OPS), -1, 3, 99]])
    magnitude = torch.ones(1, batch)
    out = augment_policy(images.to(device), index.to(device), 0, oy.to(device), ox.to(device), None, op.to(device),
                         magnitude.to(device)).cpu()
    assert torch.equal(out[0], images[0]) and torch.equal(out[3], images[2])
    assert not out[1].any() and not out[2].any()


# ------------------------------------------------------------------------------------------------
# Bad inputs: named, with what was expected; raised by the fake implementation too.


def _good_inputs(batch: int = 4, steps: int = 2):
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    oy, ox, flipped = _offsets(batch, 2, True)
    return dict(images=images, index=torch.arange(batch), padding=2, oy=oy, ox=ox, flipped=flipped,
                op=torch.zeros(steps, batch, dtype=torch.long), magnitude=torch.zeros(steps, batch))


BAD_INPUTS = {
    "float images": (dict(images=torch.zeros(6, 3, 8, 8)), "images must be uint8"),
    "3-d images": (dict(images=torch.zeros(3, 8, 8, dtype=torch.uint8)), r"images must be uint8 \(N, C, H, W\)"),
    "strided images": (dict(images=torch.zeros(6, 8, 8, 3, dtype=torch.uint8).permute(0, 3, 1, 2)),
                       "images must be contiguous"),
    "huge images": (dict(images=torch.zeros(1, 3, 65, 64, dtype=torch.uint8)), "1 to 4096 pixels"),
    "float index": (dict(index=torch.zeros(4)), "index must be int32 or int64"),
    "negative padding": (dict(padding=-1), "padding must be an int >= 0"),
    "oy of another batch": (dict(oy=torch.zeros(3, 1, dtype=torch.long)), r"oy must have shape \(4,\) or \(4, 1\)"),
    "float ox": (dict(ox=torch.zeros(4, 1)), "ox must be int32 or int64"),
    "int flipped": (dict(flipped=torch.zeros(4, 1, dtype=torch.long)), "flipped must be bool"),
    "op of another batch": (dict(op=torch.zeros(2, 3, dtype=torch.long)), r"op must be int32 or int64 \(S, 4\)"),
    "float64 magnitude": (dict(magnitude=torch.zeros(2, 4, dtype=torch.float64)), "magnitude must be float32"),
    "magnitude of another shape": (dict(magnitude=torch.zeros(1, 4)), "magnitude must be float32 of op's shape"),
    "grey images with steps": (dict(images=torch.zeros(6, 1, 8, 8, dtype=torch.uint8)), "policy steps need RGB"),
}  # fmt: skip


def _faked(inputs: dict, mode: FakeTensorMode) -> dict:
    return {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_rejected(case):
    change, message = BAD_INPUTS[case]
    inputs = {**_good_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        augment_policy(**inputs)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=message):  # the fake checks the same
        augment_policy(**_faked(inputs, mode))


def test_fake_implementation_gives_the_output_shape():
    with FakeTensorMode() as mode:
        out = augment_policy(**_faked(_good_inputs(), mode))
    assert out.shape == (4, 3, 8, 8) and out.dtype == torch.uint8


def test_opcheck(device):
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _good_inputs().items()}
    inputs["images"] = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, device=device)
    inputs["op"] = torch.tensor([[1, 6, 9, 13], [5, 12, 11, 0]], device=device)
    inputs["magnitude"] = torch.tensor([[0.3, -0.5, 0.9, 0.0], [30.0, 0.0, 0.5, 0.0]], device=device)
    torch.library.opcheck(fused._augment_policy_op, tuple(inputs.values()))


def test_traces_under_torch_compile(device):
    """An opaque node for Dynamo (fullgraph): the data phase can be compiled or captured whole."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _good_inputs().items()}
    inputs["images"] = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, device=device)
    inputs["op"] = torch.tensor([[2, 7, 9, 13], [4, 12, 10, 14]], device=device)
    inputs["magnitude"] = torch.tensor([[-0.3, 0.5, -0.9, 0.0], [-3.0, 0.0, 4.0, 0.0]], device=device)
    torch._dynamo.reset()
    compiled = torch.compile(augment_policy, fullgraph=True)
    assert torch.equal(compiled(**inputs), augment_policy(**inputs))


# ------------------------------------------------------------------------------------------------
# No host syncs, one launch.


def test_makes_no_host_syncs(device):
    from vit_fast.syncs import count_host_syncs

    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _good_inputs().items()}
    with count_host_syncs() as counter, counter.phase("augment"):
        augment_policy(**inputs)
    counter.assert_sync_free("augment")


def test_cost_account_counts_one_launch():
    """The launcher goes through Launch, so vit_fast.cost plans it as the GPU runs it: one kernel
    for the whole policy, whatever the draws."""
    from vit_fast import cost

    account, inputs = cost.CostAccount(), _good_inputs(batch=16)
    with cost.CostRecorder(account):
        augment_policy(**inputs)
    assert account.ops["vit_fast::augment_policy"].launches == 1
    assert account.launches == 1 and account.casts == 0


# ------------------------------------------------------------------------------------------------
# Ahead of time: the vit-cifar launch compiles for sm_80 and sm_90 without spills.


def test_aot_compiles_without_spills():
    pytest.importorskip("triton", reason="Triton is needed to compile kernels ahead of time")
    from vit_fast.aot import TARGETS, compile_launches

    launches = fused.aot_every_config()
    assert [launch.kernel for launch in launches] == ["augment_policy_kernel"]
    assert launches[0].constexprs["BLOCK"] == 1024 and launches[0].constexprs["INTERPRETING"] is False  # mul.rn in asm
    results = compile_launches(launches)
    assert {r.capability for _, r in results} == set(TARGETS)
    for launch, r in results:
        where = f"{launch.describe()} sm_{r.capability}"
        assert not r.spills, f"{where} spills (LOCAL or STACK): {r}"
        assert r.fits_shared_memory, f"{where} needs {r.shared_bytes} B of shared memory"
