"""vit_fast::augment_finish (normalise + random erasing + mixup/cutmix + targets in one kernel)
against the torch data phase it replaces: ``normalize -> apply_erasing -> smooth_targets ->
apply_mix`` of vit_fast.augment (pipeline, erasing, mixing) on the same draws. Every operation is float32 in torch's order,
so the batch must be bit-identical (torch.equal), not merely close."""

from __future__ import annotations

import pytest
import torch

from vit_fast import cost
from vit_fast.augment.erasing import EraseDraw, apply_erasing, draw_erasing
from vit_fast.augment.mixing import MixDraw, apply_mix, draw_mix, smooth_targets
from vit_fast.augment.pipeline import normalize
from vit_fast.fused import augment_finish as fused
from vit_fast.fused.launch import Target
from vit_fast.syncs import count_host_syncs

MEAN = torch.tensor([0.5071, 0.4865, 0.4409])
STD = torch.tensor([0.2673, 0.2564, 0.2762])


def _batch(B: int, H: int, W: int, K: int, seed: int = 0, C: int = 3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, K, (B,), generator=g)
    return images, labels, g


def _erase_args(draw: EraseDraw | None):
    if draw is None:
        return None, None
    return (draw.top, draw.left, draw.height, draw.width, draw.on), draw.values if draw.values.ndim else None


def _mix_args(draw: MixDraw | None):
    if draw is None:
        return None, None
    return (draw.use_cut, draw.lam_mix, draw.y0, draw.y1, draw.x0, draw.x1, draw.lam), draw.applied


def _torch_path(images, labels, K, smoothing, erase, mix, mean=MEAN, std=STD):
    x = normalize(images, mean, std)
    if erase is not None:
        x = apply_erasing(x, erase)
    targets = smooth_targets(labels, K, smoothing)
    if mix is not None:
        x, targets = apply_mix(x, targets, mix)
    return x, targets


def _fused_path(images, labels, K, smoothing, erase, mix, mean=MEAN, std=STD):
    erase_boxes, values = _erase_args(erase)
    mix_params, applied = _mix_args(mix)
    return fused.augment_finish(images, mean, std, labels, K, smoothing, erase_boxes, values, mix_params, applied)


def _assert_same(fused_out, torch_out):
    for name, ours, ref in zip(("x", "targets"), fused_out, torch_out):
        assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape, name
        diff = (ours - ref).abs().max().item() if ours.numel() else 0.0
        assert torch.equal(ours, ref), f"{name}: max difference {diff:.3g}, expected bit-identical"


# (mixup alpha, cutmix alpha, switch prob, mix prob): mixup only, cutmix only, both with the
# switch, and both with mixing itself drawn (prob < 1).
MIXES = {"mixup": (0.8, 0.0, 0.5, 1.0), "cutmix": (0.0, 1.0, 0.5, 1.0), "switch": (0.8, 1.0, 0.5, 1.0),
         "prob": (1.0, 1.0, 0.5, 0.5)}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("erase_mode", ["const", "rand", "pixel"])
def test_matches_the_torch_path(mix, mode, erase_mode):
    """Odd batch (the middle image pairs with itself), H*W not a power of two, an awkward K."""
    B, H, W, K = 9, 6, 10, 7
    images, labels, g = _batch(B, H, W, K, seed=list(MIXES).index(mix) + 10 * len(mode) + 100 * len(erase_mode))
    mixup, cutmix, switch, prob = MIXES[mix]
    changed = 0
    for _ in range(3):  # several draws: the mixing choices and boxes differ
        erase = draw_erasing(images.shape, g, "cpu", 0.7, erase_mode, scale=(0.02, 0.4))
        mixing = draw_mix(B, H, W, mixup, cutmix, switch, mode, g, "cpu", prob)
        expected = _torch_path(images, labels, K, 0.1, erase, mixing)
        _assert_same(_fused_path(images, labels, K, 0.1, erase, mixing), expected)
        changed += int((expected[0] != normalize(images, MEAN, STD)).flatten(1).any(1).sum())
    assert changed > 0, "no image was erased or mixed: the case checks nothing"


@pytest.mark.parametrize("B", [8, 1])
def test_even_and_single_image_batches_at_cifar_classes(B):
    images, labels, g = _batch(B, 32, 32, 100, seed=B)
    erase = draw_erasing(images.shape, g, "cpu", 1.0, "pixel")
    mixing = draw_mix(B, 32, 32, 1.0, 1.0, 0.5, "elem", g, "cpu", 0.5)
    _assert_same(_fused_path(images, labels, 100, 0.1, erase, mixing),
                 _torch_path(images, labels, 100, 0.1, erase, mixing))


def test_more_classes_than_one_target_block():
    """K above the 1024 target columns of one step: the kernel loops over the row."""
    B, K = 3, 1500
    images, labels, g = _batch(B, 4, 5, K)
    labels[0] = K - 1  # the label in the last, partial block
    mixing = draw_mix(B, 4, 5, 0.8, 0.0, 0.5, "elem", g, "cpu")
    _assert_same(_fused_path(images, labels, K, 0.2, None, mixing), _torch_path(images, labels, K, 0.2, None, mixing))


def test_without_mixing_or_erasing():
    images, labels, g = _batch(5, 7, 3, 10)
    erase = draw_erasing(images.shape, g, "cpu", 1.0, "rand")
    _assert_same(_fused_path(images, labels, 10, 0.1, erase, None), _torch_path(images, labels, 10, 0.1, erase, None))
    _assert_same(_fused_path(images, labels, 10, 0.0, None, None), _torch_path(images, labels, 10, 0.0, None, None))
    # No targets (the loader keeps its labels when it does not mix): only x is written.
    x, targets = fused.augment_finish(images, MEAN, STD, labels, 0)
    assert targets.shape == (5, 0) and torch.equal(x, normalize(images, MEAN, STD))


def test_strided_inputs_as_a_data_parallel_rank_passes_them():
    """Rank 1 of 2: the erasing draws are the global batch's, sliced (strided views); the images a
    channels-last batch. Mixing is drawn for the rank's own batch."""
    B_global, H, W, K = 12, 5, 7, 9
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (6, H, W, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
    labels = torch.randint(0, K, (12,), generator=g)[1::2]
    erase = draw_erasing((B_global, 3, H, W), g, "cpu", 1.0, "pixel").rows(slice(1, None, 2))
    assert erase.top.stride(0) == 2 and not erase.values.is_contiguous()
    mixing = draw_mix(6, H, W, 0.8, 1.0, 0.5, "elem", g, "cpu")
    _assert_same(_fused_path(images, labels, K, 0.0, erase, mixing), _torch_path(images, labels, K, 0.0, erase, mixing))


def test_one_launch_planned_and_counted():
    """The op's launch plan for a GPU is one kernel (what vit_fast.cost charges it), reading the
    uint8 batch once and writing x and the targets, with torch's CUDA division."""
    B, K = 128, 100
    images, labels, g = _batch(B, 32, 32, K)
    erase = draw_erasing(images.shape, g, "cpu", 0.25, "const")
    mixing = draw_mix(B, 32, 32, 1.0, 1.0, 0.5, "batch", g, "cpu", 0.5)
    erase_boxes, values = _erase_args(erase)
    mix_params, applied = _mix_args(mixing)
    args = (images, MEAN, STD, labels, K, 0.0, *erase_boxes, values, *mix_params, applied)
    outputs = (torch.empty(images.shape), torch.empty(B, K))
    launches = fused.launch_plan("augment_finish", args, outputs, Target(False, "cuda", 132))
    assert len(launches) == 1 and launches[0].grid == (64, 3)
    assert launches[0].constexprs["DIVIDE_BY_RECIPROCAL"]
    cpu = fused.launch_plan("augment_finish", args, outputs, Target(False, "cpu", 0))
    assert not cpu[0].constexprs["DIVIDE_BY_RECIPROCAL"]
    kernels = cost.custom_op_kernels(torch.ops.vit_fast.augment_finish.default, args, {})
    assert len(kernels) == 1
    assert kernels[0].bytes_written == B * 3 * 32 * 32 * 4 + B * K * 4
    assert kernels[0].bytes_read >= B * 3 * 32 * 32


def test_the_fused_training_run_builds_its_batches_with_the_kernel():
    """run.setup gives the fused backend the fused data phase (and the torch backend the torch
    one): the as-trained account of a fused step charges its data phase one augment_finish launch;
    the torch step's only fused op is the draw kernel every backend but the reference shares on a GPU."""
    fused_data = cost.account_step_as_trained("vit-cifar", 16, "fused").phases["data"].ops
    torch_data = cost.account_step_as_trained("vit-cifar", 16, "torch").phases["data"].ops
    assert fused_data["vit_fast::augment_finish"].launches == 1
    assert [op for op in torch_data if op.startswith("vit_fast::")] == ["vit_fast::augment_draw"]


def test_no_host_syncs():
    images, labels, g = _batch(6, 8, 8, 10)
    erase = draw_erasing(images.shape, g, "cpu", 0.5, "pixel")
    mixing = draw_mix(6, 8, 8, 0.8, 1.0, 0.5, "elem", g, "cpu", 0.5)
    with count_host_syncs() as counter, counter.phase("data"):
        _fused_path(images, labels, 10, 0.1, erase, mixing)
    counter.assert_sync_free()


def test_opcheck():
    images, labels, g = _batch(5, 4, 6, 10)
    erase = draw_erasing(images.shape, g, "cpu", 1.0, "rand")
    mixing = draw_mix(5, 4, 6, 0.8, 1.0, 0.5, "batch", g, "cpu", 0.5)
    erase_boxes, values = _erase_args(erase)
    mix_params, applied = _mix_args(mixing)
    args = (images, MEAN, STD, labels, 10, 0.1, *erase_boxes, values, *mix_params, applied)
    torch.library.opcheck(torch.ops.vit_fast.augment_finish.default, args)
    plain = (images, MEAN, STD, labels, 0, 0.0, *(None,) * 14)
    torch.library.opcheck(torch.ops.vit_fast.augment_finish.default, plain)


def test_compiled_matches_eager():
    images, labels, g = _batch(4, 4, 4, 5)
    mixing = draw_mix(4, 4, 4, 0.8, 1.0, 0.5, "elem", g, "cpu")
    mix_params, _ = _mix_args(mixing)

    def finish(images, labels):
        return fused.augment_finish(images, MEAN, STD, labels, 5, 0.1, mix=mix_params)

    eager = finish(images, labels)
    compiled = torch.compile(finish, fullgraph=True)(images, labels)
    _assert_same(compiled, eager)


def test_bad_inputs_name_the_value():
    images, labels, g = _batch(4, 4, 4, 5)
    erase = draw_erasing(images.shape, g, "cpu", 1.0, "const")
    boxes = (erase.top, erase.left, erase.height, erase.width, erase.on)
    mixing = draw_mix(4, 4, 4, 0.8, 0.0, 0.5, "elem", g, "cpu")
    mix_params, _ = _mix_args(mixing)
    with pytest.raises(ValueError, match=r"images must be uint8 \(B, C, H, W\), got torch.float32"):
        fused.augment_finish(images.float(), MEAN, STD, labels, 5)
    with pytest.raises(ValueError, match=r"mean must be float32 of shape \(3,\), got torch.float32 \(4,\)"):
        fused.augment_finish(images, torch.zeros(4), STD, labels, 5)
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \(4,\), got torch.int32"):
        fused.augment_finish(images, MEAN, STD, labels.int(), 5)
    with pytest.raises(ValueError, match=r"smoothing must lie in \[0, 1\], got 1.5"):
        fused.augment_finish(images, MEAN, STD, labels, 5, 1.5)
    with pytest.raises(ValueError, match=r"missing \['erase_on'\]"):
        fused.augment_finish(images, MEAN, STD, labels, 5, erase=(*boxes[:4], None))
    with pytest.raises(TypeError, match="erase_on must be torch.bool, got torch.float32"):
        fused.augment_finish(images, MEAN, STD, labels, 5, erase=(*boxes[:4], erase.top))
    with pytest.raises(ValueError, match=r"erase_top must have shape \(4,\) or \(4, 1\), got \(3, 1\)"):
        fused.augment_finish(images, MEAN, STD, labels, 5, erase=(erase.top[:3], *boxes[1:]))
    with pytest.raises(ValueError, match=r"erase_values of shape \(4, 2, 1, 1\) does not broadcast"):
        fused.augment_finish(images, MEAN, STD, labels, 5, erase=boxes, erase_values=torch.zeros(4, 2, 1, 1))
    with pytest.raises(ValueError, match=r"mix parameters must have shape \(1,\) or \(4,\), got \(3,\)"):
        fused.augment_finish(images, MEAN, STD, labels, 5, mix=tuple(t[:3] for t in mix_params))
    with pytest.raises(ValueError, match="mixing needs targets to mix, got num_classes 0"):
        fused.augment_finish(images, MEAN, STD, labels, 0, mix=mix_params)
    with pytest.raises(ValueError, match="mix_applied given without the mixing parameters"):
        fused.augment_finish(images, MEAN, STD, labels, 5, mix_applied=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        fused.augment_finish(images, MEAN.to("meta"), STD, labels, 5)
    huge = torch.empty(2**16, 3, 2**7, 2**7, dtype=torch.uint8, device="meta")  # 3 * 2**30 elements
    huge_labels = torch.empty(2**16, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"images spanning 3221225472 elements; at most 2147483647"):
        fused.augment_finish(huge, MEAN.to("meta"), STD.to("meta"), huge_labels, 5)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    images, labels, _ = _batch(2, 4, 4, 5)
    with pytest.raises(ValueError, match="cannot run the Triton kernels"):
        fused.augment_finish(images, MEAN, STD, labels, 5)


def test_config_is_a_pure_function_of_the_shapes():
    u8 = torch.uint8
    assert (fused.choose_config(image_size=3 * 32 * 32, num_classes=100, dtype=u8, interpret=False)
            == fused.AugmentFinishConfig(1024, 128, 4))
    assert fused.choose_config(image_size=3 * 5 * 7, num_classes=1500, dtype=u8, interpret=True).block_k == 1024
    with pytest.raises(ValueError, match="at least one element each, got 0"):
        fused.choose_config(image_size=0, num_classes=10, dtype=u8, interpret=False)


@pytest.mark.gpu(reason="the CUDA arithmetic (division by the float32 reciprocal "
                    "of 255, no FMA contraction) is compared with torch's CUDA kernels only on a GPU")
def test_matches_the_torch_path_on_cuda():
    B, H, W, K = 128, 32, 32, 100
    images, labels, g = _batch(B, H, W, K)
    erase = draw_erasing(images.shape, g, "cpu", 0.5, "pixel")
    mixing = draw_mix(B, H, W, 1.0, 1.0, 0.5, "elem", g, "cpu", 0.5)
    move = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    erase = EraseDraw(*(move(t) for t in vars(erase).values()))
    mixing = MixDraw(*(move(t) for t in vars(mixing).values()))
    args = (images.cuda(), labels.cuda(), K, 0.1, erase, mixing, MEAN.cuda(), STD.cuda())
    _assert_same(_fused_path(*args), _torch_path(*args))


def test_aot_compiles_without_spills():
    """The vit-cifar batch's launches (``aot_every_config``: const erasing with a mix probability,
    pixel erasing always mixed) compile for sm_80 and sm_90 without spills."""
    from vit_fast.aot import TARGETS, compile_launches

    results = compile_launches(fused.aot_every_config())
    assert {r.capability for _, r in results} == set(TARGETS) and len(results) == 2 * len(TARGETS)
    for launch, r in results:
        assert launch.options == {"enable_fp_fusion": False}
        assert not r.spills and r.fits_shared_memory, f"{launch.describe()} sm_{r.capability}: {r}"
