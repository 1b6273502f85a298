"""GPU paths that no other test reaches, each body proven on the CPU where it can run there.

- The fused ops and the model on a given device: the CPU (interpreter / C++ twin), the default
  CUDA device, and ``cuda:1`` while the current device stays ``cuda:0`` (a data-parallel rank r
  works on ``cuda:r``; Triton launches on the current device unless the launcher switches).
- The same on a non-default CUDA stream whose inputs are written late: a kernel launched on the
  wrong stream reads them before they are written.
- ``python -m vit_fast.train --fused`` for a few real steps against ``--backend torch`` from the
  same seed: the loss of every step agrees within a stated bound.
- The relative comparison helpers of ``vit_fast.testing`` reject a zeroed gradient, which the
  absolute tolerance they replace accepted.

fp16 autocast on CUDA is a case of tests/test_fused_model.py (the whole-model training step runs
under bf16 and fp16 autocast).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from vit_fast import ViTConfig, ops
from vit_fast import run as run_mod
from vit_fast import train as train_mod
from vit_fast.model import ViTClassifier
from vit_fast.testing import assert_close_relative, assert_parity, assert_parity_relative, devices

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU (cuda:1); the same "
                              "body runs on the CPU and on the default GPU")
ON_DEVICES = [*devices(), pytest.param(torch.device("cuda:1"), marks=TWO_GPUS)]
# fp32 kernels against the fp32 reference: the kernels accumulate in fp32 (tl.dot with
# input_precision="ieee", no TF32), so they differ only by summation order; over at most a few
# hundred terms that is ~1e-6 of the largest value, and 1e-4 leaves room without admitting a
# wrong result.
REL_FP32 = 1e-4
TINY = ViTConfig(dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=10)


def op_cases(device: torch.device) -> list[tuple[str, object, list[torch.Tensor]]]:
    """(name, fn(backend, *inputs) -> output, fp32 inputs) for every fused op and the model."""

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape)).to(device)

    D, N = 32, 65
    model = ViTClassifier(TINY).to(device)
    names = [n for n, _ in model.named_parameters()]

    def model_fn(backend, images, *params):
        return functional_call(model.set_backend(backend), dict(zip(names, params)), (images,))

    return [
        ("layer_norm", lambda be, x, w, b: ops.layer_norm(x, w, b, 1e-6, be),
         [randn(2, N, D), 1 + randn(D, scale=0.1), randn(D, scale=0.1)]),
        ("add_layer_norm", lambda be, x, r, w, b: sum(ops.add_layer_norm(x, r, w, b, 1e-6, be)),
         [randn(2, N, D), randn(2, N, D), 1 + randn(D, scale=0.1), randn(D, scale=0.1)]),
        ("attention_packed", lambda be, qkv: ops.attention_packed(qkv, 0.0, be),
         [randn(1, N, 3, 2, 16)]),  # (B, N, 3, H, Dh)
        ("mlp", lambda be, x, w1, b1, w2, b2, r: ops.mlp(x, w1, b1, w2, b2, "none", be, residual=r),
         [randn(17, D), randn(2 * D, D, scale=D**-0.5), randn(2 * D, scale=0.1), randn(D, 2 * D, scale=(2 * D) ** -0.5),
          randn(D, scale=0.1), randn(17, D)]),
        ("patch_embed", lambda be, *a: ops.patch_embed(*a, be),
         [randn(2, 3, 32, 32), randn(D, 3, 4, 4, scale=0.1), randn(D, scale=0.1), randn(1, 1, D), randn(1, N, D)]),
        ("model", model_fn,
         [randn(1, 3, 32, 32), *(p.detach() + 0.05 * torch.randn_like(p) for p in model.parameters())]),
    ]


def forward_backward(fn, backend: str, inputs: list[torch.Tensor], grad_out: torch.Tensor | None = None):
    """fn's output and the gradients of all its inputs; grad_out defaults to a fixed random one."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(backend, *inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("device", ON_DEVICES, ids=str)
def test_fused_ops_and_model_on_device(device):
    """Every fused op and the fused model match the reference on ``device``, forward and every
    input gradient, and leave their results there. For ``cuda:1`` the current device stays
    ``cuda:0``, as in a process that did not call ``torch.cuda.set_device``."""
    if device.type == "cuda":
        assert device.index is None or device.index != torch.cuda.current_device(), "cuda:1 must not be current"
    for name, fn, inputs in op_cases(device):
        out, grads = forward_backward(fn, "fused", inputs)
        out_ref, grads_ref = forward_backward(fn, "reference", inputs)
        assert out.device == device or (device.index is None and out.device.type == device.type), (
            f"{name}: output on {out.device}, expected {device}")
        assert_close_relative(out, out_ref, REL_FP32, name=f"{name} output on {device}")
        for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
            assert g.device == out.device, f"{name}: gradient {i} on {g.device}, expected {out.device}"
            assert_close_relative(g, g_ref, REL_FP32, name=f"{name} gradient {i} on {device}")


@pytest.mark.parametrize("device", ON_DEVICES, ids=str)
def test_fused_ops_and_model_on_a_side_stream(device):
    """The fused ops launch on the current stream: run on a side stream whose inputs are written
    only after a ~10 ms sleep queued on that stream, every op gives the default-stream result. A
    kernel launched on the default stream would read NaN-filled inputs before they are written."""
    if device.type != "cuda":
        pytest.skip("a CUDA stream exists only on a GPU; test_fused_ops_and_model_on_device runs this body's "
                    "ops and comparisons on the CPU")
    stream = torch.cuda.Stream(device)
    for name, fn, inputs in op_cases(device):
        expected, expected_grads = forward_backward(fn, "fused", inputs)
        late = [torch.full_like(t, float("nan")) for t in inputs]
        grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(device)
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(10_000_000)  # GPU clock cycles: milliseconds in which the inputs stay NaN
            for dst, src in zip(late, inputs):
                dst.copy_(src)
            out, grads = forward_backward(fn, "fused", late, grad_out)
        stream.synchronize()
        # Not bitwise: cuBLAS (the model's linears) may pick another reduction on another stream.
        # A launch on the wrong stream gives NaN or stale values, far outside REL_FP32.
        assert_close_relative(out, expected, REL_FP32, name=f"{name} output on a side stream")
        for i, (g, e) in enumerate(zip(grads, expected_grads)):
            assert_close_relative(g, e, REL_FP32, name=f"{name} gradient {i} on a side stream")


# --- python -m vit_fast.train --fused against --backend torch ------------------------------------

# The CPU twin: one block of width 32 on 4 synthetic 16x16 images (17 tokens, the interpreter's
# budget), one step per epoch so that every epoch's train_loss is one step's loss; warm-up over
# the first step, then a high learning rate so that the weights move and a wrong gradient shows
# in the following losses.
CLI_CPU = ["--dataset", "synthetic", "--synthetic-size", "4", "--image-size", "16", "--batch-size", "4",
           "--eval-batch-size", "4", "--depth", "1", "--dim", "32", "--heads", "2", "--epochs", "4",
           "--warmup-epochs", "1", "--lr", "3e-3"]
# The GPU run: the default preset (vit-cifar, 9 blocks) on batch 128, one step per epoch, under the
# training recipe LOSS_BOUND was measured with on a GPU (crop and flip, clipping at 1.0; the lee2021
# default's mixing and repeated augmentation came later and have not been measured there).
CLI_GPU = ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "128", "--eval-batch-size", "128",
           "--epochs", "6", "--warmup-epochs", "1", "--lr", "1e-3", "--recipe", "basic", "--clip-grad", "1.0"]
# Largest allowed |loss_fused - loss_torch| at any step. fp32: the kernels round differently from
# cuBLAS/ATen only in summation order (~1e-6 relative), compounding over a few AdamW steps; 2e-3 is
# the bound of the 20-step loss-curve test in test_fused_model.py (the CPU twin differs by ~3e-7;
# a wrong gradient moves the next losses by ~0.1, as the steps do). bf16 autocast (the default on
# CUDA): the fused backend's residual stream is bf16 where the torch backend's stays fp32, the
# logits differ by about 1% (bf16's 2^-8 relative rounding over 9 blocks), and the cross-entropy
# moves by at most 2 x max|logit difference|; 5e-2 allows that at logits of size ~2 plus compounding.
LOSS_BOUND = {"fp32": 2e-3, "bf16": 5e-2}


def cli_params() -> list:
    out = []
    for device in devices():
        for precision in ("fp32", "bf16"):
            if device.type == "cpu" and precision == "bf16":
                continue  # the training command runs autocast on CUDA only
            out.append(pytest.param(device, precision, id=f"{device.type}-{precision}"))
    return out


@pytest.mark.parametrize("device,precision", cli_params())
def test_train_cli_fused_follows_torch(tmp_path, monkeypatch, device, precision):
    """A few real steps of ``python -m vit_fast.train --fused`` and of ``--backend torch`` from the
    same seed (same initial weights, data order, augmentation and stochastic-depth masks): the
    training losses agree within LOSS_BOUND at every step and the validation losses too. On the
    CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest), which the
    command accepts for --fused."""
    monkeypatch.setattr(run_mod, "write_curves", lambda *a: None)  # the plot is seconds of matplotlib, not compared
    argv = [*(CLI_GPU if device.type == "cuda" else CLI_CPU), "--device", str(device), "--seed", "3"]
    if precision == "fp32" and device.type == "cuda":
        argv.append("--no-amp")
    runs = {}
    for backend in ("torch", "fused"):
        flag = ["--fused"] if backend == "fused" else ["--backend", "torch"]
        train_mod.main([*argv, *flag, "--out-dir", str(tmp_path / backend)])
        runs[backend] = [json.loads(ln) for ln in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
    torch_run, fused_run = runs["torch"], runs["fused"]
    assert [m["step"] for m in fused_run] == [m["step"] for m in torch_run] == list(range(1, len(torch_run) + 1)), (
        "one step per epoch expected, so that train_loss is one step's loss")
    bound = LOSS_BOUND[precision]
    losses = [(t["train_loss"], f["train_loss"]) for t, f in zip(torch_run, fused_run)]
    assert losses[-1][0] < losses[0][0] - bound, (
        f"the torch run's loss barely moved ({losses}); agreement within {bound} would say little")
    for key in ("train_loss", "val_loss"):
        worst = max(abs(t[key] - f[key]) for t, f in zip(torch_run, fused_run))
        assert worst <= bound, (
            f"{key}: fused and torch differ by up to {worst:.3e} (> {bound:g}); per step (torch, fused): "
            f"{[(t[key], f[key]) for t, f in zip(torch_run, fused_run)]}")


# --- the comparison helpers have teeth ----------------------------------------------------------

def test_relative_comparisons_reject_a_zeroed_gradient():
    """A whole-model gradient check built on the relative helpers fails for an all-zero fused
    gradient of every parameter, including those whose gradient is below 1e-3, which the absolute
    ``assert_parity(..., atol=1e-3)`` it replaces let through."""
    torch.manual_seed(0)
    cfg = ViTConfig(dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=10)
    model = ViTClassifier(cfg).set_backend("reference")  # timm's initialisation, as in training
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(10, (32,))  # norm1.weight's gradient is < 1e-3

    def grads(m, x):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x).float(), labels).backward()
        return {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    g_ref = grads(model, images)
    low = ViTClassifier(cfg).set_backend("reference")
    low.load_state_dict(model.state_dict())
    g_pt = grads(low.bfloat16(), images.bfloat16())
    small = [n for n, g in g_ref.items() if g.abs().max() < 1e-3]
    assert small, "expected parameters whose gradient is below 1e-3 at initialisation"
    for name in small:  # what the absolute tolerance accepted
        assert_parity(torch.zeros_like(g_pt[name]), g_pt[name], g_ref[name], atol=1e-3, name=name)
    for name in g_ref:
        assert_parity_relative(g_pt[name].float(), g_pt[name], g_ref[name], 1e-2, name=name)  # the real one passes
        zero = torch.zeros_like(g_ref[name])
        with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
            assert_parity_relative(zero, g_pt[name], g_ref[name], 1e-2, name=name)
        with pytest.raises(AssertionError, match="exceeds"):
            assert_close_relative(zero, g_ref[name], 1e-2, name=name)
        with pytest.raises(AssertionError, match="exceeds"):
            assert_close_relative(-g_ref[name], g_ref[name], 1e-2, name=name)


def test_relative_parity_refuses_a_baseline_too_poor_to_judge():
    ref = torch.linspace(-1, 1, 11)
    poor = ref + 0.5  # a same-precision baseline off by half the scale: 2 x 0.5 + slack >= 1
    with pytest.raises(AssertionError, match="would accept an all-zero result"):
        assert_parity_relative(ref.clone(), poor, ref, 1e-2, name="t")
    with pytest.raises(AssertionError, match="the reference is all zero"):
        assert_close_relative(torch.zeros(3), torch.zeros(3), 1e-2, name="t")
    with pytest.raises(ValueError, match="rel must be in"):
        assert_close_relative(ref, ref, 1.0)
