"""The whole model on the fused backend against the reference, on identical weights.

Every fused op has its own parity tests; this file checks that they compose: the fused ViT's
logits and every parameter gradient match the reference ViT's, and training with it follows the
reference loss curve. Without a GPU the Triton kernels run in the interpreter and the patch
embedding runs the extension's CPU code.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from vit_fast import ViTConfig
from vit_fast.model import ViTClassifier
from vit_fast.testing import assert_compiled_matches_eager, assert_parity, max_abs_diff

SMALL = ViTConfig(dim=64, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=10)  # 65 tokens, head dim 32
TINY = ViTConfig(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)  # for many steps in the interpreter


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def logits_and_grads(model, images, labels):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def batch(device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g).to(device)
    labels = torch.randint(10, (3,), generator=g).to(device)
    return images, labels


def test_fused_model_matches_reference_fp32(device, batch):
    model = ViTClassifier(SMALL).to(device)
    with torch.no_grad():  # break the near-zero init symmetry so every gradient is substantial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out_ref, g_ref = logits_and_grads(model.set_backend("reference"), *batch)
    out, g = logits_and_grads(model.set_backend("fused"), *batch)
    # fp32 end to end, through 2 blocks, with one bound on every device: the kernels' fp32 path
    # multiplies with tl.dot(input_precision="ieee") (no TF32 on a GPU either), and the linears
    # are fp32 GEMMs (cuBLAS on a GPU, where PyTorch keeps TF32 off unless asked), so fused and
    # reference differ only in summation order, about 1e-6 of each value.
    if device.type == "cuda":
        assert torch.get_float32_matmul_precision() == "highest", (
            f"float32 matmul precision is {torch.get_float32_matmul_precision()!r}: TF32 GEMMs in the reference "
            "would need a looser bound; this test expects PyTorch's default 'highest'")
    tol = 1e-4
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        scale = g_ref[name].abs().max().item()
        assert scale > 0, f"{name}: zero reference gradient, the test would have no teeth"
        assert max_abs_diff(g[name], g_ref[name]) <= tol * max(scale, 1e-2), (
            f"{name}: fused gradient differs by {max_abs_diff(g[name], g_ref[name]):.3e} (scale {scale:.3e})")


def test_fused_model_matches_reference_fp16_by_parity_rule(device, batch):
    images, labels = batch
    model = ViTClassifier(SMALL).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref32 = ViTClassifier(SMALL).to(device)
    ref32.load_state_dict(model.state_dict())
    out_ref, g_ref = logits_and_grads(ref32.set_backend("reference"), images, labels)  # fp32 truth
    model.half()
    out_pt, g_pt = logits_and_grads(model.set_backend("reference"), images.half(), labels)
    out, g = logits_and_grads(model.set_backend("fused"), images.half(), labels)
    assert_parity(out, out_pt, out_ref, atol=1e-3, name="logits")
    for name in g_ref:
        assert_parity(g[name], g_pt[name], g_ref[name], atol=1e-3, name=f"grad {name}")


def test_fused_training_follows_the_reference_loss_curve(device):
    """Twenty AdamW steps from the same weights and batches: the fused loss curve stays within
    2e-3 of the reference curve at every step (fp32; differences are rounding, compounding)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(20, 2, 3, 32, 32, generator=g).to(device)
    labels = torch.randint(10, (20, 2), generator=g).to(device)
    curves = {}
    for backend in ("reference", "fused"):
        torch.manual_seed(0)
        model = ViTClassifier(TINY, backend=backend).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        losses = []
        for step in range(20):
            loss = F.cross_entropy(model(images[step]), labels[step])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = losses
    ref, fused = torch.tensor(curves["reference"]), torch.tensor(curves["fused"])
    assert ref[-5:].mean() < ref[:5].mean(), "the reference did not learn; the comparison would be vacuous"
    assert (fused - ref).abs().max() < 2e-3, f"loss curves diverge: {list(zip(ref.tolist(), fused.tolist()))}"


def test_fused_backend_keeps_the_state_dict(device):
    a = ViTClassifier(SMALL, backend="torch")
    b = ViTClassifier(SMALL, backend="fused")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())


def test_fused_rejects_attention_dropout(device):
    model = ViTClassifier(SMALL.replace(attn_dropout=0.1), backend="fused").to(device).train()
    with pytest.raises(ValueError, match="fused attention kernel has no dropout"):
        model(torch.randn(1, 3, 32, 32, device=device))


def test_fused_model_under_torch_compile_fullgraph(device, batch):
    """The whole fused model compiles as one graph (our ops are opaque custom ops to Dynamo) and
    matches eager, forward and backward (images' gradient included)."""
    model = ViTClassifier(SMALL, backend="fused").to(device)
    assert_compiled_matches_eager(model, batch[0], rtol=1e-4, atol=1e-5)


def test_fused_model_under_autocast(device, batch):
    """Training runs under autocast (bf16 on CUDA): the fused ops take the autocast dtype at their
    boundaries. On a CPU the interpreter cannot run bf16 tl.dot, so fp16 autocast stands in. The
    fused residual stream is 16-bit where the torch backend's stays fp32, so the check is the
    parity rule against a 16-bit reference model, plus fp32 gradients for the fp32 parameters."""
    images, labels = batch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    model = ViTClassifier(SMALL).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out_ref, g_ref = logits_and_grads(model.set_backend("reference"), images, labels)  # fp32 truth
    with torch.autocast(device.type, dtype=dtype):
        out, g = logits_and_grads(model.set_backend("fused"), images, labels)
    assert out.dtype == dtype and all(v.dtype == torch.float32 for v in g.values())
    low = ViTClassifier(SMALL).to(device)
    low.load_state_dict(model.state_dict())
    out_pt, g_pt = logits_and_grads(low.to(dtype).set_backend("reference"), images.to(dtype), labels)
    assert_parity(out, out_pt, out_ref, atol=1e-3, name="logits")
    for name in g_ref:
        assert_parity(g[name], g_pt[name], g_ref[name], atol=1e-3, name=f"grad {name}")
