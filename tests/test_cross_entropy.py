"""vit_fast::cross_entropy: the fused soft-target cross-entropy with label smoothing.

The reference is ``F.cross_entropy(logits.float(), target, label_smoothing=s)``, what the torch
backend's training step computes (and what the fused one replaces): fp32 parity is tight, 16-bit
logits follow the parity rule against the fp32 loss of the same rounded logits. The edge cases
that this op decides differently from PyTorch (see ``vit_fast.fused.cross_entropy``) are pinned
here. Without a GPU the kernels run in Triton's interpreter.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from vit_fast import ops
from vit_fast.fused import cross_entropy as fused
from vit_fast.testing import assert_compiled_matches_eager, assert_parity, max_abs_diff

SMOOTHING = 0.1  # the lee2021 recipe's


def _inputs(batch, classes, soft, device, dtype=torch.float32, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(batch, classes, generator=g)).to(dtype)
    if soft:  # mixup-like: two one-hots mixed with a random weight, smoothed elsewhere by the op
        a, b = torch.randint(classes, (2, batch), generator=g)
        lam = torch.rand(batch, 1, generator=g)
        target = lam * F.one_hot(a, classes) + (1 - lam) * F.one_hot(b, classes)
    else:
        target = torch.randint(classes, (batch,), generator=g)
    return logits.to(device), target.to(device)


def _fused(logits, target, smoothing=SMOOTHING):
    z = logits.detach().clone().requires_grad_(True)
    loss = fused.cross_entropy(z, target, smoothing)
    loss.backward()
    return loss.detach(), z.grad


def _torch(logits, target, smoothing=SMOOTHING):
    """PyTorch's loss and logits gradient, computed in fp32 (or fp64) as the torch backend does."""
    z = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(z.float() if z.dtype != torch.float64 else z, target, label_smoothing=smoothing)
    loss.backward()
    return loss.detach(), z.grad


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
# (64, 200): vit-64 on Tiny-ImageNet (vit_fast.config).
@pytest.mark.parametrize("batch,classes", [(1, 7), (128, 100), (37, 1000), (130, 7), (64, 200)])
@pytest.mark.parametrize("smoothing", [0.0, SMOOTHING])
def test_fp32_matches_pytorch(device, batch, classes, soft, smoothing):
    logits, target = _inputs(batch, classes, soft, device)
    loss, grad = _fused(logits, target, smoothing)
    loss_ref, grad_ref = _torch(logits, target, smoothing)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == torch.float32
    # fp32 sums of at most 1000 terms in another order, and exp/log of the same inputs.
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert max_abs_diff(grad, grad_ref) <= 2e-6 * grad_ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("classes", [100, 1000])
def test_16_bit_logits_follow_the_parity_rule(device, dtype, soft, classes):
    """The logits are read in 16 bits and computed in fp32: the loss is the fp32 loss of the same
    rounded logits (fp32 tight); the gradient, stored in 16 bits, is within the parity rule of the
    fp32 gradient, against the torch backend's (fp32 gradient cast back to the logits' dtype)."""
    logits, target = _inputs(128, classes, soft, device, dtype=dtype)
    loss, grad = _fused(logits, target)
    loss_ref, grad_ref = _torch(logits.float(), target)  # fp32 truth from the same rounded logits
    _, grad_pt = _torch(logits, target)  # the torch backend: logits.float() and its gradient cast
    assert grad.dtype == grad_pt.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert_parity(grad.float(), grad_pt.float(), grad_ref, atol=0.0, name="dlogits")


def test_gradcheck_fp64(device):
    for soft in (False, True):
        logits, target = _inputs(3, 5, soft, device, dtype=torch.float64)
        if soft:
            target = target.double()
        z = logits.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z: fused.cross_entropy(z, target, 0.25), (z,))


def test_fp64_matches_pytorch(device):
    logits, target = _inputs(16, 10, True, device, dtype=torch.float64)
    target = target.double()
    loss, grad = _fused(logits, target, 0.25)  # 0.25: exact in the kernel's fp32 smoothing argument
    loss_ref, grad_ref = _torch(logits, target, 0.25)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-15)


def test_deterministic(device):
    logits, target = _inputs(1000, 100, True, device, dtype=torch.bfloat16)
    first, second = _fused(logits, target), _fused(logits, target)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ---------------------------------------------------------------------------------------------
# Edge cases


def test_extreme_logits_stay_finite(device):
    logits, target = _inputs(64, 100, False, device)
    logits = logits.sign() * 1e4  # +-1e4: exp overflows unless the row max is subtracted
    for soft in (False, True):
        tgt = F.one_hot(target, 100).float() if soft else target
        loss, grad = _fused(logits, tgt)
        loss_ref, grad_ref = _torch(logits, tgt)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
        assert max_abs_diff(grad, grad_ref) <= 2e-6 * grad_ref.abs().max().item()


def test_minus_infinity_logits(device):
    """-inf marks a class of probability 0. With labels and no smoothing it only matters for the
    normaliser, as in PyTorch; with smoothing (weight s/K > 0 on it) the loss is +inf, as in
    PyTorch, and the gradient stays finite. Soft targets with weight 0 on it give a finite loss,
    where PyTorch's soft-target path gives NaN (0 * -inf): the op's documented choice. A row of
    only -inf logits has no distribution: NaN."""
    logits, labels = _inputs(4, 6, False, device)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    logits[:, 5] = float("-inf")
    loss, grad = _fused(logits, labels, 0.0)
    loss_ref, grad_ref = _torch(logits, labels, 0.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-7)

    loss, grad = _fused(logits, labels, SMOOTHING)
    loss_ref, grad_ref = _torch(logits, labels, SMOOTHING)
    assert loss.item() == loss_ref.item() == float("inf")
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-7)

    soft = F.one_hot(labels, 6).float()
    loss, grad = _fused(logits, soft, 0.0)
    torch.testing.assert_close(loss, _torch(logits, labels, 0.0)[0], rtol=2e-6, atol=0)
    assert torch.isnan(_torch(logits, soft, 0.0)[0])  # PyTorch's 0 * -inf, which this op avoids

    logits[2] = float("-inf")
    with warnings.catch_warnings():  # the interpreter's numpy warns on -inf - -inf, the NaN we want
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, grad = _fused(logits, labels, 0.0)
    assert torch.isnan(loss) and torch.isnan(_torch(logits, labels, 0.0)[0])


def test_soft_targets_that_do_not_sum_to_one_are_taken_as_given(device):
    logits, _ = _inputs(8, 10, False, device)
    g = torch.Generator().manual_seed(3)
    target = torch.rand(8, 10, generator=g).to(device) * 0.3  # rows sum to about 1.5, not 1
    loss, grad = _fused(logits, target)
    loss_ref, grad_ref = _torch(logits, target)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert max_abs_diff(grad, grad_ref) <= 2e-6 * grad_ref.abs().max().item()


def test_empty_batch(device):
    logits, labels = torch.zeros(0, 10, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    with warnings.catch_warnings():  # the interpreter's numpy warns on the mean's 0 / 0, the NaN we want
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, grad = _fused(logits, labels)
    assert torch.isnan(loss) and torch.isnan(_torch(logits, labels)[0]) and grad.shape == (0, 10)


@pytest.mark.parametrize("bad_label", [-1, -100, 10, 1 << 40])
def test_out_of_range_labels_make_their_row_nan(device, bad_label):
    """No host-side range check (it would be a sync): the row's loss and gradient are NaN, so the
    batch loss is NaN and the training loop's non-finite watch reports the step. The other rows'
    gradients are untouched. (-100 is PyTorch's ignore_index, which this op does not have.)"""
    logits, labels = _inputs(4, 10, False, device)
    labels[1] = bad_label
    loss, grad = _fused(logits, labels)
    assert torch.isnan(loss)
    assert torch.isnan(grad[1]).all()
    keep = torch.tensor([0, 2, 3], device=device)
    _, grad_ref = _torch(logits[keep], labels[keep])
    torch.testing.assert_close(grad[keep], grad_ref * 3 / 4, rtol=2e-6, atol=1e-9)  # mean over 4 rows, not 3


# ---------------------------------------------------------------------------------------------
# Registration, dispatch, launches


def test_opcheck(device):
    for soft in (False, True):
        logits, target = _inputs(5, 7, soft, device)
        z = logits.requires_grad_(True)
        torch.library.opcheck(torch.ops.vit_fast.cross_entropy.default, (z, target, SMOOTHING))
        grad = torch.tensor(0.5, device=device)
        torch.library.opcheck(torch.ops.vit_fast.cross_entropy_backward.default,
                              (grad, logits.detach(), target, SMOOTHING))


class _Loss(torch.nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, logits):
        return fused.cross_entropy(logits, self.target, SMOOTHING)


def test_torch_compile_fullgraph_matches_eager(device):
    logits, target = _inputs(16, 10, True, device)
    assert_compiled_matches_eager(_Loss(target), logits, rtol=1e-6, atol=1e-7)


def test_ops_dispatch(device):
    """The fused backend runs the op; the others compute PyTorch's loss in fp32."""
    logits, target = _inputs(8, 10, True, device, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.cross_entropy(logits, target, SMOOTHING, "fused"),
                               fused.cross_entropy(logits, target, SMOOTHING), rtol=0, atol=0)
    expected = F.cross_entropy(logits.float(), target, label_smoothing=SMOOTHING)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(ops.cross_entropy(logits, target, SMOOTHING, backend), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ops.cross_entropy(logits, target, SMOOTHING, "cudnn")


def test_one_kernel_each_way_and_no_cast():
    """What the cost account sees (``vit_fast.cost.custom_op_kernels``): the ops' launch plans, for a
    GPU, are one Triton launch each and dispatch no aten kernel, on bf16 logits."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from vit_fast.fused.launch import Target

    class Aten(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in ("empty", "empty_strided"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with FakeTensorMode():
        logits = torch.randn(128, 100, dtype=torch.bfloat16)
        target, grad = torch.rand(128, 100), torch.ones(())
        gpu = Target(interpret=False, device_type="cuda", multiprocessors=132)
        loss, dlogits = torch.empty(()), torch.empty(logits.shape, dtype=logits.dtype)
        with Aten() as aten:
            launches = fused.launch_plan("cross_entropy", (logits, target, SMOOTHING), (loss,), gpu)
            launches += fused.launch_plan("cross_entropy_backward", (grad, logits, target, SMOOTHING), (dlogits,), gpu)
    assert [launch.kernel.fn.__name__ for launch in launches] == ["cross_entropy_fwd_kernel",
                                                                  "cross_entropy_bwd_kernel"]
    assert launches[0].grid == (1,)  # one program: the fixed summation order
    assert aten.ops == [], aten.ops


def test_bad_inputs_are_rejected(device):
    logits, labels = _inputs(4, 10, False, device)
    soft = F.one_hot(labels, 10).float()
    cases = [
        ((logits[0], labels), ValueError, r"logits must have shape \(B, K\), got \(10,\)"),
        ((logits.long(), labels), TypeError, "logits must be float16, bfloat16, float32 or float64, got torch.int64"),
        ((logits, labels[:3]), ValueError, r"labels must have shape \(B,\) = \(4,\).*got \(3,\)"),
        ((logits, labels.int()), TypeError, "target must be int64 labels .* got dtype torch.int32"),
        ((logits, soft[:, :9]), ValueError, r"soft targets must have the logits' shape \(4, 10\), got \(4, 9\)"),
        ((logits, soft.half()), TypeError, "soft targets must be float32 or the logits' dtype"),
        ((logits, labels, 1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        ((logits, labels, float("nan")), ValueError, "label_smoothing must be in"),
        ((torch.zeros(2, fused.MAX_CLASSES + 1, device=device), labels[:2]), ValueError,
         rf"K must be in \[1, {fused.MAX_CLASSES}\], got {fused.MAX_CLASSES + 1}"),
        ((logits, soft.clone().requires_grad_(True)), ValueError, "soft targets receive no gradient"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            fused.cross_entropy(*args)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        fused.cross_entropy(logits, labels.to("meta"))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90 (vit_fast.aot)


def test_choose_config_holds_a_row_per_block():
    def choose(classes, dtype=torch.float32):
        return fused.choose_config(classes=classes, dtype=dtype)

    assert choose(100) == fused.CrossEntropyConfig(block_b=32, block_k=128, num_warps=8)
    assert choose(7).block_b == 32 and choose(7).block_k == 8
    assert choose(1000) == fused.CrossEntropyConfig(block_b=4, block_k=1024, num_warps=8)
    assert choose(fused.MAX_CLASSES).block_b == 1
    # The tile is a function of K alone: the same for every logits dtype, interpreted or not.
    assert {fused.choose_config(classes=100, dtype=dtype, interpret=interpret)
            for dtype in (torch.float16, torch.bfloat16, torch.float64) for interpret in (False, True)} == {choose(100)}


def test_aot_compiles_without_spills():
    """vit-cifar's training loss (batch 128, 100 classes, bf16 logits; soft targets, the CLI's
    default, and labels), forward and backward, and the widest tiles (1000 classes, MAX_CLASSES),
    as the launchers build them (``aot_every_config``)."""
    pytest.importorskip("triton", reason="Triton is needed to compile kernels ahead of time")
    from vit_fast.aot import TARGETS, compile_launches

    results = compile_launches(fused.aot_every_config())
    assert {r.name for _, r in results} == {"cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"}
    assert {r.capability for _, r in results} == set(TARGETS)
    for launch, r in results:
        assert not r.spills, f"{launch.describe()} sm_{r.capability} spills: {r}"
        assert r.fits_shared_memory, f"{launch.describe()} sm_{r.capability} needs {r.shared_bytes} B of shared memory"
