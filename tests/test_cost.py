"""The per-step cost account: its counting rules, the step as trained (phases, host syncs), the
roofline arithmetic, and the fusion goals it measures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vit_fast import cost
from vit_fast import step as step_mod
from vit_fast.fused import attention as fused_attention
from vit_fast.fused import launch as fused_launch
from vit_fast.fused import mlp as fused_mlp


def test_counting_rules():
    acc = cost.CostAccount()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    with cost.CostRecorder(acc):
        z = x + y  # one launch: reads 2 x 8 KiB, writes 8 KiB
        v = z.t().contiguous()  # a transpose (a view: free), then a real copy
        _ = v.view(-1)  # a view: free
        z.mul_(2.0)  # in place: reads z, writes z
        b = torch.randn(32).expand(64, 32)  # an expanded (stride-0) tensor is 128 B, not 8 KiB
        _ = z + b
        _ = z.to(torch.bfloat16)  # a standalone cast
        _ = z.to(torch.float32)  # no-op: same dtype, nothing launched
    n = 64 * 32 * 4
    assert acc.ops["aten::add"].launches == 2
    assert acc.ops["aten::add"].bytes_read == 2 * n + (n + 32 * 4)
    assert acc.ops["aten::add"].bytes_written == 2 * n
    assert acc.ops["aten::mul_"].bytes_read == n and acc.ops["aten::mul_"].bytes_written == n
    assert "aten::view" not in acc.ops and "aten::t" not in acc.ops and "aten::transpose" not in acc.ops
    assert (acc.ops["aten::clone"].launches, acc.ops["aten::clone"].bytes_read, acc.ops["aten::clone"].bytes_written) == (1, n, n)
    assert acc.ops["aten::_to_copy"].launches == 1 and acc.casts == 1
    assert acc.launches == sum(c.launches for c in acc.ops.values()) == len(acc.kernels)


def test_flops_of_products_from_shapes():
    acc = cost.CostAccount()
    a, b, bias = torch.randn(8, 16), torch.randn(16, 4), torch.randn(4)
    with cost.CostRecorder(acc):
        a @ b
        torch.addmm(bias, a, b)
        torch.randn(3, 8, 16) @ torch.randn(3, 16, 4)  # bmm
    assert acc.ops["aten::mm"].flops == 2 * 8 * 16 * 4
    assert acc.ops["aten::addmm"].flops == 2 * 8 * 16 * 4
    assert acc.ops["aten::bmm"].flops == 3 * 2 * 8 * 16 * 4


def test_roofline_arithmetic_on_a_hand_checkable_case():
    gpu = cost.GPU("toy", peak_flops=1e12, bandwidth=1e9)
    acc = cost.CostAccount()
    acc.charge("aten::mm", [cost.Kernel(bytes_read=1_000_000, bytes_written=500_000, flops=3_000_000_000)])
    acc.charge("aten::add", [cost.Kernel(bytes_read=2_000_000, bytes_written=1_000_000, flops=1_000)])  # memory: 3 ms
    acc.charge("vit_fast::toy", [cost.Kernel(0, 0, 0), cost.Kernel(0, 1_000_000, 0)])  # one call, two kernels: 1 ms
    # mm: max(3e9 / 1e12, 1.5e6 / 1e9) = 3 ms; add: max(1e3 / 1e12, 3e6 / 1e9) = 3 ms; toy: 0 + 1 ms.
    assert acc.roofline_s(gpu, captured=True) == pytest.approx(7e-3)
    # Uncaptured: four launches and one custom-op call of host time on top.
    assert acc.host_s() == pytest.approx(4 * cost.LAUNCH_OVERHEAD_S + cost.CUSTOM_OP_CALL_S)
    assert acc.roofline_s(gpu, captured=False) == pytest.approx(7e-3 + acc.host_s())
    assert (acc.launches, acc.custom_op_calls) == (4, 1)
    h100 = cost.GPUS["H100"]
    assert (h100.peak_flops, h100.bandwidth) == (989e12, 3.35e12)
    assert (cost.GPUS["A100"].peak_flops, cost.GPUS["A100"].bandwidth) == (312e12, 2.0e12)


def test_custom_op_counted_as_its_launchers_kernels():
    """A vit_fast op counts the kernels its launcher issues at that shape, not one per call."""
    M, d, hidden = 96, 32, 64
    dt = torch.bfloat16
    x, w1, b1 = torch.randn(M, d, dtype=dt), torch.randn(hidden, d, dtype=dt), torch.randn(hidden, dtype=dt)
    w2, b2, hid = torch.randn(d, hidden, dtype=dt), torch.randn(d, dtype=dt), torch.randn(M, hidden, dtype=dt)
    fwd = cost.custom_op_kernels(torch.ops.vit_fast.mlp.default, (x, w1, b1, w2, b2, "none", x), {})
    # The launcher itself says how many kernels a GPU runs: fc1 and fc2, then gelu_bwd and the
    # backward's products (both layers' weight and bias gradients and dX).
    aot = fused_mlp.aot_launches(M, d, hidden, d, dt)
    assert len(fwd) == len(aot) - 2 == 2
    bwd = cost.custom_op_kernels(torch.ops.vit_fast.mlp_backward.default,
                                 (x, x, w1, b1, w2, hid, "none", [True] * 5), {})
    # gelu_bwd, then one launch of both layers' weight and bias gradients and dX (the bias sums
    # accumulated in fp32 and stored in bf16 by that kernel: no cast).
    assert len(bwd) == 1 + 1
    assert sum(k.cast for k in bwd) == 0
    grad_pre = M * hidden * dt.itemsize  # (M, Hd), written by gelu_bwd, read by the launch of grad_x, grad_w1, grad_b1
    assert bwd[0].bytes_written == grad_pre
    assert bwd[1].bytes_read >= grad_pre
    assert bwd[0].flops == 2 * M * hidden * (d + d)  # dY W2 and the recomputed pre-activation
    assert bwd[1].flops == 2 * M * 3 * d * hidden  # dW2, dW1 and dX
    # Attention: the launcher's forward and backward launches, as aot_launches lists them.
    B, N, H, D = 2, 24, 2, 16
    qkv = torch.randn(B, N, 3, H, D, dtype=dt)
    out, lse = torch.randn(B, N, H * D, dtype=dt), torch.randn(B, H, N)
    a_fwd = cost.custom_op_kernels(torch.ops.vit_fast.attention_packed.default, (qkv, D ** -0.5), {})
    a_bwd = cost.custom_op_kernels(torch.ops.vit_fast.attention_packed_backward.default,
                                   (out, qkv, out, lse, D ** -0.5), {})
    assert len(a_fwd) + len(a_bwd) == len(fused_attention.aot_launches(B, N, H, D, dt))
    assert a_fwd[0].flops == 4 * B * H * N * N * D


def test_a_gpu_plan_runs_nothing_and_leaves_the_interpreter_switch():
    """The account asks each op's launch_plan for a GPU's launches (no interpreter, the GPU's
    multiprocessors): building the plan launches nothing, reads no global mode and changes no
    switch, and CPU tensors still need the interpreter to run a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vit_fast.fused import layernorm as fused_layernorm

    before = fused_launch.interpreting()
    gpu = fused_launch.Target(interpret=False, device_type="cuda", multiprocessors=132)
    with FakeTensorMode():
        x, w = torch.randn(8 * 65, 64), torch.randn(64)
        y, stats = torch.empty(8 * 65, 64), torch.empty(8 * 65)
        plan = fused_layernorm.launch_plan("layer_norm", (x, w, w, 1e-6, None), (y, stats, stats), gpu)
        back = fused_layernorm.launch_plan("layer_norm_backward", (y, None, x, w, stats, stats, None, None),
                                           (torch.empty_like(x), torch.empty(0), w, w), gpu)
    assert [launch.kernel.fn.__name__ for launch in plan + back] == [
        "layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "column_sum_kernel"]
    assert not any(launch.constexprs["INTERPRETING"] for launch in plan + back)  # a plan is the GPU's
    assert back[0].grid[0] <= 4 * 132 and back[0].args["P"] == back[0].grid[0]
    assert fused_launch.interpreting() == before
    if not before:
        with pytest.raises(ValueError, match="interpreter"):
            fused_launch.check_launchable("x", torch.empty(4))


@pytest.fixture(scope="module")
def vit_cifar_accounts():
    return {b: cost.account_training_step("vit-cifar", 128, b) for b in ("reference", "torch", "fused")}


def test_training_step_is_accounted_for_every_backend(vit_cifar_accounts):
    for name, acc in vit_cifar_accounts.items():
        ops = acc.ops
        assert acc.launches > 100 and acc.bytes > 1e9, name
        assert any(k.startswith("aten::_foreach") for k in ops), f"{name}: the AdamW step is missing"
    fused_ops = vit_cifar_accounts["fused"].ops
    # One Python-level call per op and block: 9 blocks, 19 LayerNorms (2 per block + final).
    assert fused_ops["vit_fast::attention_packed"].calls == 9
    assert fused_ops["vit_fast::mlp"].calls == 9
    assert fused_ops["vit_fast::layer_norm"].calls + fused_ops["vit_fast::add_layer_norm"].calls == 19
    assert fused_ops["vit_fast::patch_embed"].calls == 1
    # Kernels: as many per call as the launcher plans (mlp: fc1 and fc2).
    assert fused_ops["vit_fast::mlp"].launches == 9 * 2


def test_fusion_goals_at_vit_cifar_batch_128(vit_cifar_accounts):
    """Issue 7's goals: the fused step moves at most 0.4x the bytes and launches at most 0.25x the
    operators of the reference step, and less than the torch backend on both."""
    ref, pt, fused = (vit_cifar_accounts[b] for b in ("reference", "torch", "fused"))
    assert fused.bytes <= 0.4 * ref.bytes, (fused.bytes, ref.bytes)
    assert fused.launches <= 0.25 * ref.launches, (fused.launches, ref.launches)
    assert fused.bytes < pt.bytes and fused.launches < pt.launches, (fused.to_dict()["launches"], pt.launches)


@pytest.fixture(scope="module", params=[(), ("--mixup", "0.8", "--cutmix", "1.0")], ids=["default", "mixup+cutmix"])
def as_trained(request):
    return {b: cost.account_step_as_trained("vit-cifar", 16, b, request.param) for b in ("reference", "torch", "fused")}


def test_step_as_trained_has_every_phase_and_no_host_sync(as_trained):
    for name, step in as_trained.items():
        assert tuple(step.phases) == step_mod.PHASES, name
        for phase, acc in step.phases.items():
            assert acc.launches > 0, (name, phase)
            assert step.syncs[phase] == 0, (name, phase, step.syncs)
        ops = step.total.ops
        assert "aten::_fused_adamw_" in step.phases["optimizer"].ops, name  # AdamW as make_optimizer builds it
        assert step.phases["clip"].launches > 0 and step.phases["data"].flops > 0, name
        if name != "fused":  # the fused step converts in its kernels' registers (see below)
            assert ops["aten::_to_copy"].casts > 0, f"{name}: bf16 autocast should cast"
    fused = as_trained["fused"]
    # On a GPU the torch backend draws its batch with the fused draw kernel (vit_fast.loader), so it
    # calls exactly that op, in its data phase; the reference backend keeps the draws' torch twin.
    assert fused.total.custom_op_calls > 1
    assert as_trained["torch"].total.custom_op_calls == 1
    assert as_trained["torch"].phases["data"].ops["vit_fast::augment_draw"].calls == 1
    assert as_trained["reference"].total.custom_op_calls == 0
    # The model's phases are the same code whatever the data phase did.
    assert fused.phases["forward_backward"].launches < as_trained["reference"].phases["forward_backward"].launches


def test_step_table_and_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    # The GPU-time estimate (its own compile of these batch-8 launches) is checked by test_gpu_time.py.
    result = cost.main(["--batch-size", "8", "--backends", "torch", "fused", "--json", str(out), "--top", "3",
                        "--no-estimate"])
    text = capsys.readouterr().out
    assert "not a timing" in text and "roofline model" in text and "H100 SXM" in text
    for phase in step_mod.PHASES:
        assert f"fused      {phase}" in text
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["step"] == "as_trained" and set(data["backends"]) == {"torch", "fused"}
    fused = data["backends"]["fused"]
    assert set(fused["phases"]) == set(step_mod.PHASES) and fused["total"]["host_syncs"] == 0
    assert fused["roofline"]["H100"]["eager_ms"] > fused["roofline"]["H100"]["graph_ms"] > 0
    assert math.isclose(sum(p["launches"] for p in fused["phases"].values()), fused["total"]["launches"])
    # Host time per step: eager dispatches every launch and custom-op call, a graphed step one replay.
    assert "host time per step (modelled" in text
    for backend in ("torch", "fused"):
        total, host = data["backends"][backend]["total"], data["host_per_step"][backend]
        assert host["graphed_s"] == cost.GRAPH_REPLAY_S
        assert math.isclose(host["eager_s"], total["launches"] * cost.LAUNCH_OVERHEAD_S
                            + total["custom_op_calls"] * cost.CUSTOM_OP_CALL_S)


def test_data_phase_and_step_counts_of_issue_24():
    """The default step (vit-cifar, batch 128, lee2021) counted on fake tensors: the fused data
    phase at most 10 dispatched ops (the draws, the step's advance, the two pixel kernels), the
    whole fused step at most 150, and the torch data phase only its pixel work after the same draw."""
    steps = {b: cost.account_step_as_trained("vit-cifar", 128, b) for b in ("torch", "fused")}
    calls = {b: {p: sum(o.calls for o in a.ops.values()) for p, a in s.phases.items()} for b, s in steps.items()}
    fused_data = steps["fused"].phases["data"].ops
    assert set(fused_data) == {"vit_fast::augment_draw", "aten::add_", "vit_fast::augment_policy",
                               "vit_fast::augment_finish"}, sorted(fused_data)
    assert calls["fused"]["data"] <= 10 and sum(calls["fused"].values()) <= 150, calls["fused"]
    assert steps["torch"].phases["data"].ops["vit_fast::augment_draw"].calls == 1


def test_cli_pure_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    cost.main(["--pure", "--preset", "vit-cifar", "--batch-size", "8", "--backends", "reference", "fused",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert "a model of memory traffic and launches, not a timing" in text and "vit_fast::attention_packed" in text
    data = json.loads(out.read_text())
    assert set(data["backends"]) == {"reference", "fused"} and data["batch_size"] == 8 and data["step"] == "pure"


def test_bench_train_without_a_gpu_prints_the_account(tmp_path, monkeypatch, capsys, benchmark_script):
    from vit_fast import benchmarking as common

    bench_train = benchmark_script("bench_train")

    monkeypatch.setattr(common, "gpu_available", lambda: False)  # the CPU path, on any machine
    assert bench_train.main(["--batch-sizes", "8", "--backends", "torch", "fused", "--out-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "account of the step as trained" in text and "roofline model" in text
    data = json.loads((tmp_path / "bench_train.json").read_text())
    assert not data["timed"] and set(data["cost_account"]["vit-cifar/b8"]) == {"torch", "fused"}
    assert set(data["cost_account"]["vit-cifar/b8"]["fused"]["phases"]) == set(step_mod.PHASES)


def test_bench_train_speedup_table(benchmark_script):
    bench_train = benchmark_script("bench_train")

    providers = bench_train.provider_names(("torch", "fused"), ("eager", "cuda-graphs"))
    assert providers == ["torch/eager", "torch/cuda-graphs", "fused/eager", "fused/cuda-graphs"]
    row = {"preset": "vit-cifar", "batch": 128, "torch/eager": {"images_per_s": 1000.0},
           "torch/cuda-graphs": {"error": "out of memory"}, "fused/eager": {"images_per_s": 800.0},
           "fused/cuda-graphs": {"images_per_s": 2500.0}}
    last = bench_train.speedup_table([row], providers).splitlines()[-1].split()
    assert last == ["vit-cifar", "128", "1.00", "-", "0.80", "2.50"]


@pytest.fixture(scope="module")
def as_trained_128():
    """The CLI's default step (lee2021 recipe, bf16 autocast, drop-path 0.1, clip 1.0) at the
    account's default batch, on the torch and fused backends."""
    return {b: cost.account_step_as_trained("vit-cifar", 128, b) for b in ("torch", "fused")}


def test_fused_step_targets_as_trained(as_trained_128):
    """The fused step as trained launches at most 0.40x the torch step's kernels, moves at most 0.6x
    its bytes and runs at most 5 standalone float casts: for the whole step (data phase included)
    and for the model's phases alone (forward + backward, clip, optimizer), so the data phase's
    fusion does not hide the model's."""
    pt, fused = as_trained_128["torch"], as_trained_128["fused"]
    model = ("forward_backward", "clip", "optimizer")
    for name, (f, t) in {"step": (fused.total, pt.total),
                         "model phases": (cost.merge([fused.phases[p] for p in model]),
                                          cost.merge([pt.phases[p] for p in model]))}.items():
        assert f.launches <= 0.40 * t.launches, (name, f.launches, t.launches)
        assert f.bytes <= 0.6 * t.bytes, (name, f.bytes, t.bytes)
    assert fused.total.casts <= 5, fused.total.to_dict()["ops"]
    assert all(fused.syncs[p] == 0 for p in step_mod.PHASES), fused.syncs
