"""The training step as `python -m vit_fast.train` runs it: host syncs, the device-side learning-rate
schedule, the optimizer, non-finite losses, CUDA-graph batching and arguments, graph replay on a GPU."""

import contextlib
import math

import pytest
import torch

from vit_fast import datasets, optim
from vit_fast import run as run_mod
from vit_fast import step as step_mod
from vit_fast import train as train_mod
from vit_fast.augment.pipeline import normalize
from vit_fast.distributed import World
from vit_fast.syncs import OUTSIDE, count_host_syncs

# A tiny run: 8x8 images in 2x2 patches of 4x4, two blocks, batches of 8 (the fused backend runs in
# Triton's interpreter on a CPU).
TINY = ["--dataset", "synthetic", "--synthetic-size", "16", "--synthetic-classes", "4", "--image-size", "8",
        "--patch-size", "4", "--dim", "32", "--heads", "2", "--depth", "2", "--batch-size", "8", "--epochs", "2",
        "--crop-padding", "1"]
# The tests of test_train.py: 8 steps per epoch.
SMALL = ["--dataset", "synthetic", "--synthetic-size", "512", "--synthetic-classes", "10", "--dim", "64",
         "--heads", "4", "--depth", "2", "--batch-size", "64", "--warmup-epochs", "1", "--device", "cpu"]
CUDA = pytest.mark.gpu(reason="CUDA graphs and fused CUDA optimizers need a GPU")


def parse(*argv: str) -> train_mod.TrainConfig:
    return train_mod.parse_args(list(argv))  # the recipe's values resolved, as the CLI resolves them


def tiny_run(tmp_path, device, *extra: str) -> run_mod.TrainingRun:
    args = parse(*TINY, "--device", str(device), "--out-dir", str(tmp_path), *extra)
    train_mod.check_paths(args)
    return run_mod.setup(args, World(), torch.device(device))


# ------------------------------------------------------------------------------------------------
# The host-sync counter.


def test_sync_counter_catches_each_kind_per_phase():
    x = torch.randn(4, requires_grad=True)
    with count_host_syncs() as counter:
        with counter.phase("clean"):
            (x * 2).sum().backward()
        with counter.phase("item"):
            _ = (x * 3).sum().item()  # the deliberate sync
        with counter.phase("reads"):
            _ = x.tolist()  # no aten op on a CPU tensor: caught at the Python level
            _ = bool(x.sum() > 0)
        with counter.phase("host_data"):
            _ = torch.tensor([1.0, 2.0])
        with counter.phase("shape"):
            _ = x.detach().nonzero()
        _ = x.sum().item()  # outside any phase
    c = counter.counts
    assert c["clean"].total == 0
    assert (c["item"].item, c["item"].local_scalar_dense, c["item"].total) == (1, 1, 1)
    assert c["reads"].item == 2 and c["reads"].total == 2
    assert c["host_data"].host_data == 1 and c["host_data"].total == 1
    assert c["shape"].data_dependent == 1
    assert c[OUTSIDE].total == 1
    assert counter.total("item", "reads") == 3
    counter.assert_sync_free("clean")
    with pytest.raises(AssertionError, match=r"item: item \(Tensor.item\)"):
        counter.assert_sync_free("item")


def test_sync_counter_looks_inside_custom_ops():
    """The dispatcher runs an op's body with the modes off; the counter runs it under them."""

    @torch.library.custom_op("test_step::reads_back", mutates_args=())
    def reads_back(x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()

    with count_host_syncs() as counter, counter.phase("op"):
        reads_back(torch.randn(3))
    assert counter.counts["op"].total == 1, counter.events


def test_sync_counter_sees_per_batch_host_constants():
    """What the loader did before: normalisation constants built from lists for every batch."""
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with count_host_syncs() as counter, counter.phase("data"):
        normalize(images, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    assert counter.counts["data"].host_data == 2


# ------------------------------------------------------------------------------------------------
# Zero host syncs per step.


@pytest.mark.parametrize("mix", [False, True], ids=["crop_flip", "mixup_cutmix"])
@pytest.mark.parametrize("backend", ["reference", "torch", "fused"])
def test_training_step_makes_no_host_syncs(tmp_path, backend, mix):
    """A default step (the lee2021 recipe: AutoAugment, repeated augmentation, erasing, mixup and
    cutmix; drop path 0.1, label smoothing, AdamW and the schedule; clipping at 1.0 turned on; bf16
    autocast, which the CLI enables on CUDA, forced on here) issues no host sync in any phase, nor
    does a crop-and-flip step (--recipe basic). The first step is counted too: lazy optimizer state
    must not sync either."""
    extra = ["--backend", backend, "--clip-grad", "1.0"] + ([] if mix else ["--recipe", "basic"])
    run = tiny_run(tmp_path, "cpu", *extra)
    run.amp = True
    batches = step_mod.epoch_batches(run, 0)
    for _ in range(2):
        with count_host_syncs() as counter:
            x, y = step_mod.next_batch(batches, counter.phase)
            loss = step_mod.train_step(run, x, y, counter.phase)
        assert set(counter.counts) == set(step_mod.PHASES)
        counter.assert_sync_free()
        assert y.shape == ((8, 4) if mix else (8,))
    assert torch.isfinite(loss)


def test_optimizer_is_fused_with_a_device_lr_and_capturable_on_cuda():
    assert optim.optimizer_options(torch.device("cuda")) == {"fused": True, "capturable": True}
    assert optim.optimizer_options(torch.device("cpu")) == {"fused": True, "capturable": False}
    model = torch.nn.Linear(4, 3)
    opt = optim.make_optimizer(optim.param_groups(model, 0.05), 1e-3, (0.9, 0.999), torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64 and lr.ndim == 0
    assert optim.lr_dtype(torch.device("cuda")) == torch.float32  # what CUDA's fused AdamW reads
    assert all(g["lr"] is lr and g["fused"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_weight_decay_groups_hold_the_right_parameters():
    """Kills the mutation ``p.ndim <= 1`` -> ``p.ndim < 1`` in ``optim.param_groups`` (biases and
    LayerNorm parameters decayed): the groups are checked by parameter name, not by their
    ``weight_decay`` values or sizes. No decay: every bias, every LayerNorm weight and bias, the
    class token and the positional embedding (3-D, excluded by name); decay: the weights of the
    patch-embedding convolution and of every Linear layer."""
    from vit_fast.config import ViTConfig
    from vit_fast.model import ViTClassifier

    model = ViTClassifier(ViTConfig(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2, num_classes=3))
    decay, no_decay = optim.param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    name_of = {id(p): n for n, p in model.named_parameters()}
    blocks = [f"blocks.{i}." for i in range(2)]
    assert sorted(name_of[id(p)] for p in decay["params"]) == sorted(
        ["patch_embed.proj.weight", "head.weight"]
        + [b + f"{layer}.weight" for b in blocks for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")])
    assert sorted(name_of[id(p)] for p in no_decay["params"]) == sorted(
        ["cls_token", "pos_embed", "patch_embed.proj.bias", "head.bias", "norm.weight", "norm.bias"]
        + [b + f"{layer}.bias" for b in blocks for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        + [b + f"{norm}.{kind}" for b in blocks for norm in ("norm1", "norm2") for kind in ("weight", "bias")])


def test_optimizer_state_is_restored_in_place():
    """A captured graph holds the optimizer's state tensors and the lr tensor: a restore writes into
    them; the lr and the flags the optimizer was built with survive a checkpoint's group settings."""

    def stepped(seed: int, lr: float) -> torch.optim.Optimizer:
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        opt = optim.make_optimizer(optim.param_groups(model, 0.05), lr, (0.9, 0.999), torch.device("cpu"))
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        return opt

    live, saved = stepped(0, 1e-3), stepped(1, 5e-4)
    lr = live.param_groups[0]["lr"]
    before = {id(t) for s in live.state.values() for t in s.values()}
    state = optim.optimizer_state(saved)
    state["param_groups"] = [{**g, "fused": None} for g in state["param_groups"]]  # as an older checkpoint
    optim.restore_optimizer(live, state)
    assert {id(t) for s in live.state.values() for t in s.values()} == before
    assert all(g["lr"] is lr and g["fused"] for g in live.param_groups) and float(lr) == 5e-4
    for p_live, p_saved in zip(live.state.values(), saved.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(p_live[key], p_saved[key]), key


@CUDA
def test_optimizer_built_on_cuda_is_fused_and_capturable(tmp_path):
    run = tiny_run(tmp_path, "cuda")
    assert all(g["fused"] and g["capturable"] for g in run.optimizer.param_groups)
    assert run.scheduler.lr.device.type == "cuda" and run.scheduler.steps.device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# The learning-rate schedule on the device.


def formula_lr(args, steps_per_epoch: int, s: int) -> float:
    """The lr of optimizer step s by warmup_cosine (on the CPU the lr tensor is float64: exactly this)."""
    factor = optim.warmup_cosine(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch,
                                     args.min_lr / args.lr)
    return args.lr * factor(s)


def test_lr_schedule_equals_the_formula_at_every_step():
    args = parse("--epochs", "3", "--warmup-epochs", "1.5", "--lr", "2e-3", "--min-lr", "1e-5")
    steps_per_epoch = 10
    opt = optim.make_optimizer(optim.param_groups(torch.nn.Linear(2, 2), 0.0), args.lr, (0.9, 0.999),
                                   torch.device("cpu"))
    sched = run_mod.make_schedule(args, opt, steps_per_epoch)
    warmup_end, last = 14, 29  # round(1.5 * 10) warm-up steps; 30 steps in all
    seen = []
    for s in range(33):  # and past the end, where the rate stays at the minimum
        assert int(sched.steps) == s
        seen.append(float(opt.param_groups[0]["lr"]))
        assert seen[-1] == formula_lr(args, steps_per_epoch, s), s
        sched.step()
    assert seen[warmup_end] == args.lr  # the peak, exactly
    assert seen[last] == formula_lr(args, steps_per_epoch, last)
    assert seen[32] == seen[30]
    # A restored schedule continues where it was; a torch LambdaLR state ("last_epoch") loads too.
    other = run_mod.make_schedule(args, opt, steps_per_epoch)
    other.load_state_dict(sched.state_dict())
    assert int(other.steps) == 33 and float(other.lr) == seen[-1]
    other.load_state_dict({"last_epoch": 7})
    assert float(opt.param_groups[0]["lr"]) == formula_lr(args, steps_per_epoch, 7)


def _record_lrs(monkeypatch) -> list[tuple[int, float, int]]:
    """(run.step, the lr the step used, the schedule's count after it) of every training step."""
    seen = []
    step = step_mod.run_step

    def recording(run, x, y, loss_scale=1.0):
        before, lr = run.step, float(run.optimizer.param_groups[0]["lr"])
        loss = step(run, x, y, loss_scale)
        seen.append((before, lr, int(run.scheduler.steps)))
        return loss

    monkeypatch.setattr(run_mod, "run_step", recording)
    return seen


def test_schedule_advances_once_per_step_in_fresh_and_resumed_runs(tmp_path, monkeypatch):
    """Issue 17: after N steps the schedule has advanced N times, and the rate at the end of
    warm-up and at the last step is the formula's, whether or not the run was resumed between."""
    seen = _record_lrs(monkeypatch)
    extra = ["--out-dir", str(tmp_path), "--epochs", "2", "--log-every", "3"]
    train_mod.train(parse(*SMALL, *extra, "--stop-after", "1"))
    fresh = list(seen)
    train_mod.train(parse(*SMALL, *extra, "--resume"))
    resumed = seen[len(fresh):]
    args, steps_per_epoch = parse(*SMALL, "--epochs", "2"), 8
    assert [s for s, _, _ in fresh] == list(range(8)) and [s for s, _, _ in resumed] == list(range(8, 16))
    for s, lr, count_after in seen:
        assert count_after == s + 1, f"the schedule advanced to {count_after} after step {s}"
        assert lr == formula_lr(args, steps_per_epoch, s), s
    assert seen[7][1] == args.lr  # end of the one warm-up epoch
    assert seen[15][1] == formula_lr(args, steps_per_epoch, 15)  # the last step
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["scheduler"]["steps"] == ckpt["step"] == 16
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == formula_lr(args, steps_per_epoch, 16)


def test_resume_with_other_steps_per_epoch_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"took 16 steps in 2 epoch\(s\), this run takes 9 per epoch"):
        run_mod.check_steps_per_epoch({"step": 16, "epoch": 2}, 9, tmp_path / "checkpoint.pt")
    run_mod.check_steps_per_epoch({"step": 16, "epoch": 2}, 8, tmp_path / "checkpoint.pt")


# ------------------------------------------------------------------------------------------------
# Non-finite losses: a device flag, read at log points and at the end of the epoch.


def _poison_forward(monkeypatch, at_call: int) -> dict:
    """From the at_call-th forward of training on (1-based), the logits are NaN."""
    calls = {"n": 0}
    wrap = run_mod._wrap

    def poisoned_wrap(*args, **kwargs):
        forward = wrap(*args, **kwargs)

        def poisoned(x):
            calls["n"] += 1
            out = forward(x)
            return out * float("nan") if calls["n"] >= at_call else out

        return poisoned

    monkeypatch.setattr(run_mod, "_wrap", poisoned_wrap)
    return calls


def test_non_finite_loss_stops_at_a_log_point_without_a_checkpoint(tmp_path, monkeypatch):
    calls = _poison_forward(monkeypatch, at_call=2)
    with pytest.raises(SystemExit) as err:
        train_mod.train(parse(*SMALL, "--out-dir", str(tmp_path), "--epochs", "2", "--log-every", "2"))
    message = str(err.value.code)
    assert "loss of optimizer step 2 (epoch 1, step 2 of 8) was not finite" in message
    assert "no checkpoint was written" in message
    # Step 2's flag is requested at step 2 and read at step 4, not at the end of the epoch.
    assert calls["n"] == 4
    assert not (tmp_path / "checkpoint.pt").exists()


def test_non_finite_loss_is_caught_at_the_epoch_end_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _poison_forward(monkeypatch, at_call=14)  # epoch 2, step 6
    with pytest.raises(SystemExit, match=r"optimizer step 14 \(epoch 2, step 6 of 8\) was not finite .*"
                                         r"checkpoint.pt still holds the last good checkpoint \(epoch 1\)"):
        train_mod.train(parse(*SMALL, "--out-dir", str(tmp_path), "--epochs", "3", "--log-every", "0"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ------------------------------------------------------------------------------------------------
# --cuda-graphs: static batches, argument checks.


def test_cuda_graphs_batches_have_one_shape_and_the_drop_is_logged(capsys):
    args = parse("--batch-size", "32", "--cuda-graphs", "--no-flip")
    ds = datasets.synthetic(100, 5, image_size=8)
    mean, std = datasets.channel_stats(ds.images)
    loader = run_mod.make_train_loader(args, World(), ds, mean, std)
    assert len(loader) == 3 and [b[0].shape[0] for b in loader] == [32, 32, 32]
    assert "last partial batch of 4 images is dropped (3 steps of 32 images per epoch)" in capsys.readouterr().out
    eager = run_mod.make_train_loader(parse("--batch-size", "32"), World(), ds, mean, std)
    assert [b[0].shape[0] for b in eager] == [32, 32, 32, 4]
    assert "dropped" not in capsys.readouterr().out
    even = run_mod.make_train_loader(args, World(), datasets.synthetic(96, 5, image_size=8), mean, std)
    assert len(even) == 3 and "dropped" not in capsys.readouterr().out


def test_graph_and_compile_mode_argument_errors(tmp_path):
    with pytest.raises(SystemExit, match="--cuda-graphs captures the training step in a CUDA graph and needs a CUDA "
                                         "device, but the device is cpu"):
        train_mod.train(parse(*SMALL, "--out-dir", str(tmp_path), "--cuda-graphs"))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any work
    with pytest.raises(SystemExit, match="--compile-mode max-autotune needs --compile"):
        parse("--compile-mode", "max-autotune")  # checked as it is parsed
    with pytest.raises(SystemExit, match="--cuda-graphs with --compile-mode reduce-overhead: that mode captures"):
        parse("--cuda-graphs", "--compile", "--compile-mode", "reduce-overhead")  # checked as it is parsed
    parse("--cuda-graphs", "--compile", "--compile-mode", "default")  # checked as it is parsed
    with pytest.raises(SystemExit, match="--log-every must be >= 0, got -1"):
        parse("--log-every", "-1")  # checked as it is parsed
    # Under torchrun each rank captures its own step: no refusal on a CUDA device.
    run_mod.check_graph_device(parse("--cuda-graphs"), World(rank=0, local_rank=0, size=2), torch.device("cuda", 0))
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse("--compile-mode", "fastest")


class _FakeCuda:
    """The torch.cuda calls GraphedStep makes, recorded in ``log`` in order, on a CPU. As a real
    capture, the fake one runs nothing: each ``train_step`` called inside ``graph(g)`` is recorded
    in ``g`` (a closure over the tensors it was given) and returns a static output tensor, and
    every ``g.replay()`` runs the recorded steps, which read the static inputs as they are then
    and write their loss into that output."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.current = self.default = _FakeStream(self, "default")
        self.capturing: _FakeGraph | None = None

    def Stream(self, device=None) -> "_FakeStream":  # noqa: N802 - torch.cuda's name
        self.log.append(("Stream",))
        return _FakeStream(self, "side")

    def current_stream(self, device=None) -> "_FakeStream":
        return self.current

    @contextlib.contextmanager
    def stream(self, s: "_FakeStream"):
        self.log.append(("enter stream", s.name))
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before
            self.log.append(("exit stream", s.name))

    def CUDAGraph(self) -> "_FakeGraph":  # noqa: N802
        self.log.append(("CUDAGraph",))
        return _FakeGraph(self)

    @contextlib.contextmanager
    def graph(self, g: "_FakeGraph"):
        self.log.append(("capture begins",))
        self.capturing = g
        try:
            yield
        finally:
            self.capturing = None
            self.log.append(("capture ends",))


class _FakeStream:
    def __init__(self, cuda: _FakeCuda, name: str) -> None:
        self.cuda, self.name = cuda, name

    def wait_stream(self, other: "_FakeStream") -> None:
        self.cuda.log.append(("wait", self.name, "for", other.name))


class _FakeGraph:
    def __init__(self, cuda: _FakeCuda) -> None:
        self.cuda, self.recorded = cuda, []

    def replay(self) -> None:
        self.cuda.log.append(("replay",))
        for work in self.recorded:
            work()


# Host-resident data ("cpu"): the host stages each batch's images before the replay (a gather and a
# copy into the static staging buffer: these ops and no other), and the captured data phase reads them.
STAGING_OPS = {"aten.slice.Tensor", "aten.index_select.out", "aten.copy_.default"}


@pytest.mark.parametrize("data_device", ["auto", "cpu"])
def test_graphed_step_warms_up_captures_and_replays_on_a_cpu(tmp_path, monkeypatch, data_device):
    """Kills the mutation that drops GraphedStep's ``replay()`` right after the capture (the
    captured batch would never be trained). With torch.cuda's streams and graphs replaced by
    recording fakes (_FakeCuda) and the real data phase and ``train_step`` on a CPU: the first
    GRAPH_WARMUP_STEPS calls are eager steps on one side stream, fenced by the stream waits; the
    next call captures once (the data phase with the step: the loader's batch is made inside the
    graph) and replays at once; later calls only replay. Every call is exactly one optimizer step
    on the loader's next batch, the batches and parameters are those of as many eager steps of
    the epoch loop, the loss sum is the eager one, and between two replays the host dispatches no
    tensor op at all (the host work of a step is the replay call); a batch of another size is
    refused. With ``--data-device cpu`` the graphed run stages each batch from host memory and
    still matches the eager steps of the device-resident run, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    extra = ("--backend", "torch", "--recipe", "lee2021", "--synthetic-size", "56", "--warmup-epochs", "1")
    run = tiny_run(tmp_path / "graphed", "cpu", *extra, "--data-device", data_device)
    eager = tiny_run(tmp_path / "eager", "cpu", *extra)
    assert run.train_loader.host_images == (data_device == "cpu") and not eager.train_loader.host_images
    for a, b in zip(run.model.parameters(), eager.model.parameters()):
        b.data.copy_(a.data)  # the same starting point
    cuda = _FakeCuda()
    for name in ("Stream", "current_stream", "stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    real, ran = step_mod.GraphedStep.data_and_step, []

    def execute(self, rows):
        cuda.log.append(("step on", cuda.current.name))
        before = self.run.train_loader.position.clone()
        loss = real(self, rows)
        ran.append((before, loss.clone()))
        return loss

    def recorded(self, rows):
        if cuda.capturing is None:
            return execute(self, rows)
        out = torch.zeros((), dtype=torch.float32)  # the graph's static output
        cuda.capturing.recorded.append(lambda: out.copy_(execute(self, rows)))
        cuda.log.append(("step recorded",))
        return out

    class OpCounter(TorchDispatchMode):  # tensor ops dispatched outside the fake replays
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not replaying:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    replaying = False
    fake_replay = _FakeGraph.replay

    def replay(graph):
        nonlocal replaying
        replaying = True
        try:
            fake_replay(graph)
        finally:
            replaying = False

    monkeypatch.setattr(_FakeGraph, "replay", replay)
    monkeypatch.setattr(step_mod.GraphedStep, "data_and_step", recorded)
    step, n_warm = step_mod.GraphedStep(run), step_mod.GRAPH_WARMUP_STEPS
    assert n_warm >= 1 and step.warmup_steps == n_warm
    warm = [("wait", "side", "for", "default"), ("enter stream", "side"), ("step on", "side"),
            ("exit stream", "side"), ("wait", "default", "for", "side")]
    loader = run.train_loader
    rows = loader.batch_rows()
    calls = len(rows)
    assert calls >= n_warm + 3 and len(set(rows)) == 1
    loader.set_epoch(0)
    loader.begin_epoch()
    losses = []
    torch.manual_seed(0)
    for i in range(calls):
        cuda.log.clear()
        if i > n_warm:
            with OpCounter() as counter:
                losses.append(step(rows[i]))
            if data_device == "cpu":
                assert "aten.index_select.out" in counter.ops and set(counter.ops) <= STAGING_OPS, (
                    f"call {i + 1}: the host dispatched {counter.ops} besides staging the batch and the replay")
            else:
                assert counter.ops == [], f"call {i + 1}: the host dispatched {counter.ops} besides the replay"
        else:
            losses.append(step(rows[i]))
        if i == 0:
            expected = [("Stream",), *warm]
        elif i < n_warm:
            expected = warm
        elif i == n_warm:
            expected = [("CUDAGraph",), ("capture begins",), ("step recorded",), ("capture ends",),
                        ("replay",), ("step on", "default")]
        else:
            expected = [("replay",), ("step on", "default")]
        assert cuda.log == expected, f"call {i + 1}"
        assert len(ran) == i + 1 and int(run.scheduler.steps) == i + 1, f"call {i + 1}: one optimizer step per call"
        assert ran[-1][0].tolist() == [0, i], f"call {i + 1} drew another step's batch"
        assert torch.equal(losses[-1], ran[-1][1]), f"call {i + 1} returned another step's loss"
    assert len(step.graph.recorded) == 1 and all(out is losses[n_warm] for out in losses[n_warm:])  # static output
    assert all(int(s["step"]) == calls for s in run.optimizer.state.values())
    torch.manual_seed(0)
    eager_sum = torch.zeros(())
    for i, (x, y) in enumerate(step_mod.epoch_batches(eager, 0)):
        loss = step_mod.train_step(eager, x, y)
        assert torch.equal(loss, ran[i][1]), f"step {i + 1}"
        eager_sum += loss * x.shape[0]
    assert torch.equal(step.loss_sum, eager_sum)
    for (name, a), b in zip(run.model.named_parameters(), eager.model.parameters()):
        assert torch.equal(a, b), name
    cuda.log.clear()
    with pytest.raises(RuntimeError, match=rf"the CUDA graph was captured for batches of {rows[0]} images per rank, "
                                           r"got 4"):
        step(4)
    assert cuda.log == [] and len(ran) == calls


# ------------------------------------------------------------------------------------------------
# GPU: graph replay against eager steps.


def _losses(tmp_path, backend: str, *extra: str, steps: int = 8) -> torch.Tensor:
    args = parse(*SMALL[:-2], "--device", "cuda", "--out-dir", str(tmp_path), "--backend", backend, *extra)
    train_mod.check_paths(args)
    torch.manual_seed(0)
    run = run_mod.setup(args, World(), torch.device("cuda"))
    run.model.train()
    if run.graph is not None:
        run.train_loader.begin_epoch()
        losses = [run.graph(run.train_loader.batch_size).clone() for _ in range(steps)]
    else:
        batches = step_mod.epoch_batches(run, 0)
        losses = [step_mod.run_step(run, *step_mod.next_batch(batches)).clone() for _ in range(steps)]
    return torch.stack(losses).float()


@CUDA
@pytest.mark.parametrize("mix", [False, True], ids=["crop_flip", "mixup_cutmix"])
@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_graph_replayed_steps_match_eager_steps(tmp_path, backend, mix):
    """8 steps (3 eager warm-up steps, the capture, 4 replays) against 8 eager steps under bf16
    autocast, by the parity rule with fp32 eager steps as the reference (the same data and
    stochastic-depth draws: the CUDA generator advances through replays as through eager steps)."""
    from vit_fast.testing import assert_parity

    extra = ("--mixup", "0.8", "--cutmix", "1.0") if mix else ("--recipe", "basic")
    graphed = _losses(tmp_path / "graphed", backend, "--cuda-graphs", *extra)
    eager = _losses(tmp_path / "eager", backend, *extra)
    fp32 = _losses(tmp_path / "fp32", backend, "--no-amp", *extra)
    assert_parity(graphed, eager, fp32, name=f"{backend} loss curve")


@CUDA
def test_resumed_graphed_run_equals_uninterrupted_graphed_run(tmp_path):
    extra = [*SMALL[:-2], "--device", "cuda", "--cuda-graphs", "--epochs", "3", "--drop-path", "0.2", "--seed", "5"]
    train_mod.train(parse(*extra, "--out-dir", str(tmp_path / "whole")))
    train_mod.train(parse(*extra, "--out-dir", str(tmp_path / "split"), "--stop-after", "1"))
    train_mod.train(parse(*extra, "--out-dir", str(tmp_path / "split"), "--resume"))
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_warmup_cosine_formula_itself():
    """The reference the device schedule is held to: linear warm-up to 1, cosine to min_ratio."""
    f = optim.warmup_cosine(4, 12, 0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(8), 0.55) and f(12) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
