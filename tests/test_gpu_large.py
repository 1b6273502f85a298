"""GPU-sized cases: the CIFAR goal shapes, long sequences, wide rows, bf16 through tl.dot, and a
whole-model training step at batch 128 under 16-bit autocast.

Every test body runs on each device of ``vit_fast.testing.devices()``: on CUDA at the sizes
above, on the CPU (Triton interpreter, the patch embedding's C++ twin) at shrunken sizes that
keep each case's structure (several key tiles with a padded last one; the ViT widths of
LayerNorm, the MLP and the model), so the setup, the shapes and the tolerances are proven on
machines without a GPU before a GPU runs them. The only case that stays on CUDA is bf16
through ``tl.dot``, which the interpreter cannot compute (bf16 LayerNorm runs on both).

Every comparison is the parity rule with a slack relative to each tensor
(``assert_parity_relative``): the fused result against the fp32 reference, allowed twice the
error of the reference computed in the fused result's own 16-bit dtype, plus REL of the
tensor's largest value. An all-zero or garbage tensor is 100% off and fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit_fast import PRESETS, reference
from vit_fast.model import ViTClassifier
from vit_fast.testing import assert_parity_relative, devices

# Slack beyond the parity rule, as a fraction of each tensor's largest value: bf16 keeps 8
# significant bits (a rounding is up to 0.4% of the value), so 1% is about two roundings of the
# largest element, far below the 100% error of a zeroed or unwritten result.
REL = 1e-2
DTYPES = (torch.bfloat16, torch.float16)


def params(gpu_cases: list, cpu_cases: list) -> list:
    """(device, dtype, case) parameters: the GPU sizes on CUDA, their shrunken twins on the CPU,
    each in bf16 and fp16."""
    out = []
    for device in devices():
        for dtype in DTYPES:
            for case in gpu_cases if device.type == "cuda" else cpu_cases:
                # bf16 runs on the CPU too: the fused ops widen bf16 dot operands to fp32 under
                # Triton's interpreter (whose own bf16 tl.dot is broken, upstream issue 11584).
                out.append(pytest.param(device, dtype, case, id=f"{device.type}-{str(dtype)[6:]}-{case}"))
    return out


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def _check(fused_fn, ref_fn, inputs, name):
    """Forward and every input gradient of fused_fn against ref_fn, by the relative parity rule:
    ref_fn in the inputs' 16-bit dtype is the like-for-like baseline, ref_fn in fp32 the truth."""
    out_shape = ref_fn(*inputs).shape
    grad_out = torch.randn(out_shape, device=inputs[0].device)
    out, grads = _grads(fused_fn, inputs, grad_out)
    out_pt, grads_pt = _grads(ref_fn, inputs, grad_out)
    out_ref, grads_ref = _grads(ref_fn, [t.float() for t in inputs], grad_out)
    assert_parity_relative(out, out_pt, out_ref, REL, name=f"{name} output")
    for i, (g, g_pt, g_ref) in enumerate(zip(grads, grads_pt, grads_ref)):
        assert g.dtype == g_pt.dtype, f"{name} grad {i}: dtype {g.dtype}, expected {g_pt.dtype}"
        assert_parity_relative(g, g_pt, g_ref, REL, name=f"{name} grad {i}")


# (batch, heads, seq_len): the CIFAR goal shape (batch 256 of 65 tokens), then long sequences. On
# the CPU one head of 197 tokens (several key tiles, the last one padded).
@pytest.mark.parametrize("device,dtype,shape", params([(256, 12, 65), (4, 12, 197), (4, 12, 577), (4, 12, 1025)],
                                                      [(1, 1, 197)]))
def test_attention_packed_large(device, dtype, shape):
    from vit_fast.fused import attention

    batch, heads, seq_len = shape
    qkv = torch.randn(batch, seq_len, 3, heads, 64, device=device, dtype=dtype)  # (B, N, 3, H, Dh)
    _check(attention.attention_packed, reference.attention_packed, [qkv], f"attention N={seq_len}")


# (rows, width): 512 images of 65 tokens on CUDA; 17 rows on the CPU (one partial row tile), at each
# ViT width.
@pytest.mark.parametrize("device,dtype,shape", params([(512 * 65, w) for w in (192, 384, 768)],
                                                      [(17, w) for w in (192, 384, 768)]))
def test_add_layer_norm_large(device, dtype, shape):
    from vit_fast.fused import layernorm

    rows, width = shape
    x, res = (torch.randn(rows, width, device=device, dtype=dtype) for _ in range(2))
    w = 1 + 0.1 * torch.randn(width, device=device, dtype=dtype)
    b = 0.1 * torch.randn(width, device=device, dtype=dtype)
    _check(lambda *a: layernorm.add_layer_norm(*a)[0] * 2 + layernorm.add_layer_norm(*a)[1],
           lambda *a: reference.add_layer_norm(*a)[0] * 2 + reference.add_layer_norm(*a)[1],
           [x, res, w, b], f"add_layer_norm width {width}")


# (rows, dim, mlp ratio): 128 images of 65 tokens on CUDA; on the CPU 17 rows (one partial row tile)
# at vit-cifar's and vit-small's MLP shapes.
@pytest.mark.parametrize("device,dtype,shape", params([(128 * 65, d, r) for d, r in ((192, 2), (192, 4), (384, 4))],
                                                      [(17, 192, 2), (17, 384, 4)]))
def test_mlp_large(device, dtype, shape):
    from vit_fast.fused import mlp

    M, dim, ratio = shape
    hidden = dim * ratio
    x, res = (torch.randn(M, dim, device=device, dtype=dtype) for _ in range(2))
    w1 = torch.randn(hidden, dim, device=device, dtype=dtype) / dim**0.5
    b1 = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    w2 = torch.randn(dim, hidden, device=device, dtype=dtype) / hidden**0.5
    b2 = 0.1 * torch.randn(dim, device=device, dtype=dtype)
    _check(lambda *a: mlp.mlp(*a[:5], "none", a[5]), lambda *a: reference.mlp(*a[:5], "none", a[5]),
           [x, w1, b1, w2, b2, res], f"mlp {dim}x{ratio}")


# (preset, batch, depth): the full presets at batch 128 on CUDA; on the CPU vit-tiny's widths and
# head count with one block and one image (the interpreter's budget).
@pytest.mark.parametrize("device,dtype,case", params([("vit-cifar", 128, None), ("vit-tiny", 128, None)],
                                                     [("vit-tiny", 1, 1)]))
def test_fused_model_autocast_training_step(device, dtype, case):
    """A training step of the fused model under 16-bit autocast (what ``python -m vit_fast.train``
    runs on a GPU; bf16 there, fp16 covers GPUs and AMP setups without bf16) against the fp32
    reference, by the parity rule. The like-for-like baseline is the reference model converted to
    the same 16-bit dtype: under autocast the fused backend's residual stream and its ops' outputs
    are 16-bit (ops cast at their boundaries), while the reference under autocast would keep an
    fp32 residual stream and fp32 elementwise work, a more precise model than the one tested."""
    preset, batch, depth = case
    cfg = PRESETS[preset] if depth is None else PRESETS[preset].replace(depth=depth)
    torch.manual_seed(0)
    model = ViTClassifier(cfg).to(device)
    with torch.no_grad():  # past the near-zero initialisation, so that every gradient is substantial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(cfg.num_classes, (batch,), device=device)

    def step(m, x, amp):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = m(x)
        F.cross_entropy(logits.float(), labels).backward()
        return logits.detach().float(), {n: p.grad.detach().float() for n, p in m.named_parameters()}

    out_ref, g_ref = step(model.set_backend("reference"), images, False)  # fp32 truth
    out, g = step(model.set_backend("fused"), images, True)
    low = ViTClassifier(cfg).to(device)
    low.load_state_dict(model.state_dict())
    out_pt, g_pt = step(low.to(dtype).set_backend("reference"), images.to(dtype), False)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters()), "autocast must leave fp32 gradients"
    assert_parity_relative(out, out_pt, out_ref, REL, name="logits")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_parity_relative(g[name], g_pt[name], g_ref[name], REL, name=f"grad {name}")
