"""Ours or the library's kernel per op (vit_fast.kernel_choice): the chooser with injected timings,
the forced modes, no timing on a CPU, the model's dispatch of a library choice to the torch
backend's op, the flag, and the choice recorded in checkpoints and kept on --resume."""

import json

import pytest
import torch

from vit_fast import kernel_choice as kc
from vit_fast import ops
from vit_fast import train as train_mod
from vit_fast.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from vit_fast.config import ViTConfig
from vit_fast.kernel_choice import KERNEL_OPS, KernelChoice, choose_for_run, choose_kernels
from vit_fast.model import ViTClassifier

CPU = torch.device("cpu")
WORKLOAD = kc.Workload(ViTConfig(image_size=8, patch_size=4, dim=32, depth=1, num_heads=2, num_classes=4), 8, False)

# (ours us, library us) per op: the library clearly faster for patch_embed and linear (by 50% and
# 4%), within the 3% tie margin for layernorm and cross_entropy, slower for attention, equal for mlp.
FAKE = {"patch_embed": (10.0, 5.0), "layernorm": (10.0, 9.8), "attention": (10.0, 12.0), "linear": (10.0, 9.6),
        "mlp": (10.0, 10.0), "cross_entropy": (10.0, 9.71)}


def never_called(op):
    raise AssertionError(f"the timer was called for {op}")


# ------------------------------------------------------------------------------------------------
# The chooser.


def test_auto_takes_the_faster_per_op_and_a_tie_goes_to_ours():
    asked = []
    choice = choose_kernels("auto", lambda op: asked.append(op) or FAKE[op], timed_on="a fake GPU")
    assert asked == list(KERNEL_OPS)  # each op timed once
    assert choice.library == ("patch_embed", "linear")
    assert {op: choice.of(op) for op in KERNEL_OPS} == {
        "patch_embed": "library", "layernorm": "ours", "attention": "ours", "linear": "library", "mlp": "ours",
        "cross_entropy": "ours"}
    assert choice.timed and dict((op, (o, lib)) for op, o, lib in choice.timings_us) == FAKE
    assert choice.note == "timed on a fake GPU"
    assert "attention=ours (10.0 vs 12.0 us)" in choice.describe()
    assert "patch_embed=library (10.0 vs 5.0 us)" in choice.describe()


def test_the_margin_is_relative_to_ours():
    margin = kc.TIE_MARGIN
    just_inside = choose_kernels("auto", lambda op: (100.0, 100.0 * (1 - margin) + 0.01))
    just_outside = choose_kernels("auto", lambda op: (100.0, 100.0 * (1 - margin) - 0.01))
    assert just_inside.library == () and just_outside.library == KERNEL_OPS


@pytest.mark.parametrize("mode, library", [("ours", ()), ("library", KERNEL_OPS)])
def test_forced_modes_time_nothing(mode, library):
    choice = choose_kernels(mode, never_called)
    assert choice.mode == mode and choice.library == library and not choice.timed
    assert f"forced by --kernels {mode}" in choice.note


def test_a_bad_timing_or_mode_is_an_error():
    with pytest.raises(RuntimeError, match=r"timing patch_embed gave nan us \(ours\)"):
        choose_kernels("auto", lambda op: (float("nan"), 1.0))
    with pytest.raises(ValueError, match="unknown kernel choice mode 'fastest'"):
        choose_kernels("fastest")


def test_auto_on_the_cpu_runs_ours_without_timing(monkeypatch):
    monkeypatch.delenv(kc.NO_TIMING_ENV, raising=False)
    assert "the device is cpu" in kc.timing_unavailable(CPU)
    choice, line = choose_for_run(None, None, CPU, WORKLOAD, timer=never_called)
    assert choice.mode == "auto" and choice.library == () and not choice.timed
    assert line.startswith("kernels (auto, not timed, ours everywhere: the device is cpu")
    monkeypatch.setenv(kc.NO_TIMING_ENV, "1")
    assert kc.timing_unavailable(torch.device("cuda")) == f"{kc.NO_TIMING_ENV} is set"


def test_auto_times_where_timing_is_possible(monkeypatch):
    monkeypatch.setattr(kc, "timing_unavailable", lambda device: None)
    choice, line = choose_for_run("auto", None, CPU, WORKLOAD, timer=lambda op: FAKE[op])
    assert choice.library == ("patch_embed", "linear")
    assert line.startswith("kernels (auto, timed on cpu, forward + backward of one block's ops at batch 8 x 5 tokens")
    assert "linear=library (10.0 vs 9.6 us)" in line


def test_a_resumed_run_keeps_its_choice_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr(kc, "timing_unavailable", lambda device: None)
    recorded = choose_kernels("auto", lambda op: FAKE[op], timed_on="GPU A").to_dict()
    for requested in (None, "auto"):  # not given, or the same mode: kept, not re-timed
        choice, line = choose_for_run(requested, recorded, CPU, WORKLOAD, timer=never_called)
        assert choice.to_dict() == recorded
        assert line.startswith("kernels (auto, the checkpoint's choice, not re-timed; timed on GPU A)")
    choice, line = choose_for_run("ours", recorded, CPU, WORKLOAD, timer=never_called)
    assert choice.library == () and choice.mode == "ours"
    assert "--kernels ours replaces the checkpoint's 'auto' choice (patch_embed=library" in line
    assert "results differ in rounding" in line


def test_record_round_trip_and_damaged_records():
    choice = choose_kernels("auto", lambda op: FAKE[op], timed_on="GPU A")
    assert KernelChoice.from_dict(choice.to_dict()) == choice
    assert json.loads(json.dumps(choice.to_dict())) == choice.to_dict()  # plain types only
    with pytest.raises(ValueError, match=r"unknown ops \['softmax'\]"):
        KernelChoice.from_dict({"mode": "auto", "ops": {"softmax": "ours"}})
    with pytest.raises(ValueError, match=r"\{'attention': 'cudnn'\} is neither 'ours' nor 'library'"):
        KernelChoice.from_dict({"mode": "auto", "ops": {"attention": "cudnn"}})
    with pytest.raises(ValueError, match="unknown kernel choice mode 'best'"):
        KernelChoice.from_dict({"mode": "best", "ops": {}})
    with pytest.raises(ValueError, match="unknown kernel op 'gelu'"):
        KernelChoice().of("gelu")
    with pytest.raises(ValueError, match="in KERNEL_OPS order"):
        KernelChoice("library", ("mlp", "attention"))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
def test_the_timed_calls_compute_the_same_op_both_ways(amp):
    """What "auto" times, run on the CPU (ours in the interpreter): each op's forward + backward on
    the workload's shapes, ours and the library's, with outputs of the same shapes and dtypes and,
    in fp32, the same values."""
    workload = kc.Workload(WORKLOAD.cfg, 2, amp, label_smoothing=0.1, soft_targets=True)
    for op in KERNEL_OPS:
        call = kc._OpCall(op, workload, CPU)
        ours, library = call.step("fused"), call.step("torch")
        assert [o.shape for o in ours] == [o.shape for o in library], op
        if not amp:
            for a, b in zip(ours, library, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=op)


# ------------------------------------------------------------------------------------------------
# The model: a library choice runs the torch backend's op, on the same weights.

TINY_CFG = ViTConfig(image_size=8, patch_size=4, dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=4)


def _pair(library: tuple[str, ...]) -> tuple[ViTClassifier, ViTClassifier]:
    """(fused model with ``library`` on the library, torch model), the same weights."""
    torch.manual_seed(0)
    fused = ViTClassifier(TINY_CFG, backend="fused").set_kernels(KernelChoice("library", library))
    plain = ViTClassifier(TINY_CFG, backend="torch")
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _forward_backward(fn, leaves):
    """fn()'s output (the first of a tuple) and the gradients of a fixed weighting of it w.r.t.
    ``leaves`` (None for a leaf the output does not depend on)."""
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    return out.detach(), torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)


def test_a_fused_model_all_on_the_library_is_the_torch_model(monkeypatch):
    for module, name in (("layernorm", "layer_norm"), ("layernorm", "add_layer_norm"),
                         ("attention", "attention_packed"), ("mlp", "mlp"), ("linear", "linear"),
                         ("cross_entropy", "cross_entropy"), ("patch_embed", "patch_embed")):
        monkeypatch.setattr(f"vit_fast.fused.{module}.{name}", lambda *a, **k: pytest.fail("ran a fused op"))
    fused, plain = _pair(KERNEL_OPS)
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 1])
    results = []
    for model in (fused, plain):
        def loss():
            logits = model(images)
            return ops.cross_entropy(logits, labels, 0.1, model.backend_for("cross_entropy"))
        value = loss()
        results.append((value.detach(), torch.autograd.grad(value, list(model.parameters()))))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


# op -> (fused module, its function that a library choice must not call, the model's call of the op,
# the input's shape, under CPU bf16 autocast or not). The linear runs ours only under autocast.
DISPATCH = {
    "patch_embed": ("patch_embed", "patch_embed", lambda m, x: m.patch_embed(x, m.cls_token, m.pos_embed),
                    (2, 3, 8, 8), False),
    "layernorm": ("layernorm", "add_layer_norm", lambda m, x: m.blocks[0].norm2.forward_add(x, x * 0.5),
                  (2, 5, 32), False),
    "attention": ("attention", "attention_packed", lambda m, x: m.blocks[0].attn(x), (2, 5, 32), False),
    "mlp": ("mlp", "mlp", lambda m, x: m.blocks[0].mlp(x, residual=x), (2, 5, 32), False),
    # bf16 activations, as the fused LayerNorm hands them to the head under autocast
    "linear": ("linear", "linear", lambda m, x: m.head(x), (2, 32), True),
    "cross_entropy": ("cross_entropy", "cross_entropy",
                      lambda m, x: ops.cross_entropy(x, torch.tensor([1, 3]), 0.1, m.backend_for("cross_entropy")),
                      (2, 4), False),
}


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_an_op_on_the_library_runs_the_torch_backends_op(op, monkeypatch):
    """Forward and backward (fp32; the linear under bf16 autocast, where the fused backend has a
    kernel of its own): bitwise the torch backend's result on the same weights, and the fused op
    never runs."""
    module, name, call, shape, amp = DISPATCH[op]
    monkeypatch.setattr(f"vit_fast.fused.{module}.{name}", lambda *a, **k: pytest.fail(f"ran vit_fast.fused.{module}"))
    fused, plain = _pair((op,))
    x = torch.randn(shape, dtype=torch.bfloat16 if amp else torch.float32, requires_grad=True)
    results = []
    for model in (fused, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            results.append(_forward_backward(lambda: call(model, x), [x, *model.parameters()]))
    (out_f, grads_f), (out_p, grads_p) = results
    assert torch.equal(out_f, out_p)
    for a, b in zip(grads_f, grads_p, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_backend_for_maps_only_the_library_ops_of_a_fused_model():
    fused, plain = _pair(("attention",))
    assert fused.backend_for("attention") == "torch" and fused.backend_for("mlp") == "fused"
    assert plain.set_kernels(KernelChoice("library", KERNEL_OPS)).backend_for("attention") == "torch"
    assert ViTClassifier(TINY_CFG, backend="reference").set_kernels(
        KernelChoice("library", KERNEL_OPS)).backend_for("mlp") == "reference"
    assert ViTClassifier(TINY_CFG, backend="fused").backend_for("mlp") == "fused"  # no choice: ours
    with pytest.raises(TypeError, match="kernels must be a KernelChoice or None, got dict"):
        fused.set_kernels({"mode": "ours"})


# ------------------------------------------------------------------------------------------------
# The training command: the flag, the start-up line, the checkpoint, --resume.

# Two steps per epoch of a one-block model; the fused backend's model ops on the library run no
# Triton kernel (the data phase's fused kernels run in the interpreter).
TINY = ["--dataset", "synthetic", "--synthetic-size", "16", "--synthetic-classes", "4", "--image-size", "8",
        "--patch-size", "4", "--dim", "32", "--heads", "2", "--depth", "1", "--batch-size", "8", "--epochs", "2",
        "--warmup-epochs", "1", "--crop-padding", "1", "--recipe", "basic", "--device", "cpu"]


def _setup(out_dir, *extra):
    """The run `python -m vit_fast.train` would set up (the kernel choice made), without training."""
    from vit_fast import run as run_mod
    from vit_fast.distributed import World

    config = train_mod.parse_args([*TINY, "--out-dir", str(out_dir), *extra])
    train_mod.check_paths(config)
    return run_mod.setup(config, World(), CPU)


@pytest.fixture(scope="module")
def library_run(tmp_path_factory):
    """A fused run's directory after its first epoch with --kernels library, and its output."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("library_run")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_mod.train(train_mod.parse_args([*TINY, "--out-dir", str(out_dir), "--fused", "--kernels", "library",
                                              "--stop-after", "1"]))
    return out_dir, out.getvalue()


def _copy(run_dir, tmp_path):
    import shutil

    return shutil.copytree(run_dir, tmp_path / "run")


def test_the_choice_is_logged_recorded_and_kept_on_resume(library_run, tmp_path, capsys):
    tmp_path, out = _copy(library_run[0], tmp_path), library_run[1]
    assert ("kernels (library, forced by --kernels library): patch_embed=library layernorm=library "
            "attention=library linear=library mlp=library cross_entropy=library\n") in out
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["kernels"]["ops"] == dict.fromkeys(KERNEL_OPS, "library") and ckpt["args"]["kernels"] == "library"
    # --resume without --kernels: the checkpoint's choice, not re-timed.
    train_mod.train(train_mod.parse_args([*TINY, "--out-dir", str(tmp_path), "--fused", "--resume"]))
    assert "kernels (library, the checkpoint's choice, not re-timed; forced by --kernels library)" in (
        capsys.readouterr().out)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["kernels"]["mode"] == "library"
    # evaluate/predict's loader runs the recorded choice on "fused", ours without one.
    model, _ = load_model(tmp_path / "checkpoint.pt", backend="fused")
    assert model.backend_choice.kernels.library == KERNEL_OPS
    # Another --kernels on resume is made afresh and logged as replacing the checkpoint's.
    run = _setup(tmp_path, "--fused", "--resume", "--kernels", "ours")
    assert run.kernels.mode == "ours" and run.model.backend_for("attention") == "fused"
    out = capsys.readouterr().out
    assert "kernels (ours, forced by --kernels ours)" in out
    assert "--kernels ours replaces the checkpoint's 'library' choice" in out


def test_a_damaged_recorded_choice_is_a_clear_error(library_run, tmp_path):
    tmp_path = _copy(library_run[0], tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["kernels"]["ops"]["attention"] = "cudnn"
    del ckpt["format"]
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"its 'kernels' entry does not read: kernel choice \{'attention': "):
        load_model(tmp_path / "checkpoint.pt", backend="fused")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt: its 'kernels' entry does not read"):
        _setup(tmp_path, "--fused", "--resume")


def test_auto_on_the_cpu_is_ours_untimed_and_other_backends_ignore_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(kc.NO_TIMING_ENV, raising=False)
    run = _setup(tmp_path / "fused", "--fused")
    assert run.kernels == KernelChoice("auto", note=run.kernels.note) and not run.kernels.timed
    assert "kernels (auto, not timed, ours everywhere: the device is cpu (timing needs a CUDA device))" in (
        capsys.readouterr().out)
    run = _setup(tmp_path / "torch", "--backend", "torch", "--kernels", "library")
    assert run.kernels is None and run.model.backend_choice.kernels is None
    assert ("note: --kernels library is ignored: it chooses between the fused backend's kernels and the "
            "library's, and --backend torch runs none of ours") in capsys.readouterr().out


def test_the_flag_is_documented_and_bad_values_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--help"])
    assert exc.value.code == 0
    assert "--kernels {auto,ours,library}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--fused", "--kernels", "fastest"])
    assert exc.value.code == 2
    assert "argument --kernels: invalid choice: 'fastest' (choose from" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# On a GPU: the real timer.


@pytest.mark.gpu(reason="times our kernels and the library's on a CUDA device")
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda_graphs"])
def test_auto_times_every_op_on_a_gpu(monkeypatch, graphed):
    monkeypatch.delenv(kc.NO_TIMING_ENV, raising=False)
    device = torch.device("cuda")
    workload = kc.Workload(ViTConfig(dim=192, depth=9, num_heads=12, mlp_ratio=2.0), 128, True, 0.1, True, graphed)
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    choice, line = choose_for_run(None, None, device, workload)
    assert torch.equal(rng[0], torch.get_rng_state()) and torch.equal(rng[1], torch.cuda.get_rng_state(device))
    assert choice.mode == "auto" and [op for op, _, _ in choice.timings_us] == list(KERNEL_OPS)
    assert line.startswith(f"kernels (auto, timed on {torch.cuda.get_device_name(device)}")
