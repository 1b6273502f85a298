"""The per-step cost account: its counting rules, and the fusion goals it measures."""

import json

import pytest
import torch

from vit_fast import cost


def test_counting_rules():
    acc = cost.CostAccount()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    with cost.OpRecorder(acc):
        z = x + y  # one launch: reads 2 x 8 KiB, writes 8 KiB
        v = z.t().contiguous()  # a transpose (a view: free), then a real copy
        _ = v.view(-1)  # a view: free
        z.mul_(2.0)  # in place: reads z, writes z
        b = torch.randn(32).expand(64, 32)  # an expanded (stride-0) tensor is 128 B, not 8 KiB
        _ = z + b
    n = 64 * 32 * 4
    assert acc.ops["aten::add"].launches == 2
    assert acc.ops["aten::add"].bytes_read == 2 * n + (n + 32 * 4)
    assert acc.ops["aten::add"].bytes_written == 2 * n
    assert acc.ops["aten::mul_"].bytes_read == n and acc.ops["aten::mul_"].bytes_written == n
    assert "aten::view" not in acc.ops and "aten::t" not in acc.ops and "aten::transpose" not in acc.ops
    assert (acc.ops["aten::clone"].launches, acc.ops["aten::clone"].bytes_read, acc.ops["aten::clone"].bytes_written) == (1, n, n)
    assert acc.launches == sum(c.launches for c in acc.ops.values())


@pytest.fixture(scope="module")
def vit_cifar_accounts():
    return {b: cost.account_training_step("vit-cifar", 128, b) for b in ("reference", "torch", "fused")}


def test_training_step_is_accounted_for_every_backend(vit_cifar_accounts):
    for name, acc in vit_cifar_accounts.items():
        ops = acc.ops
        assert acc.launches > 100 and acc.bytes > 1e9, name
        assert any(k.startswith("aten::_foreach") for k in ops), f"{name}: the AdamW step is missing"
    fused_ops = vit_cifar_accounts["fused"].ops
    # Each of our custom ops counts once per call: 9 blocks, 19 LayerNorms (2 per block + final).
    assert fused_ops["vit_fast::attention_packed"].launches == 9
    assert fused_ops["vit_fast::mlp"].launches == 9
    assert fused_ops["vit_fast::layer_norm"].launches + fused_ops["vit_fast::add_layer_norm"].launches == 19
    assert fused_ops["vit_fast::patch_embed"].launches == 1


def test_fusion_goals_at_vit_cifar_batch_128(vit_cifar_accounts):
    """Issue 7's goals: the fused step moves at most 0.4x the bytes and launches at most 0.25x the
    operators of the reference step, and less than the torch backend on both."""
    ref, pt, fused = (vit_cifar_accounts[b] for b in ("reference", "torch", "fused"))
    assert fused.bytes <= 0.4 * ref.bytes, (fused.bytes, ref.bytes)
    assert fused.launches <= 0.25 * ref.launches, (fused.launches, ref.launches)
    assert fused.bytes < pt.bytes and fused.launches < pt.launches, (fused.to_dict()["launches"], pt.launches)


def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    cost.main(["--preset", "vit-cifar", "--batch-size", "8", "--backends", "reference", "fused", "--json", str(out)])
    text = capsys.readouterr().out
    assert "a model of memory traffic and launches, not a timing" in text and "vit_fast::attention_packed" in text
    data = json.loads(out.read_text())
    assert set(data["backends"]) == {"reference", "fused"} and data["batch_size"] == 8
