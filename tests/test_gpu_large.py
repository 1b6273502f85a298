"""Cases only a GPU can run: bf16 through tl.dot, and shapes too large for the interpreter.

On a CUDA machine these run with no edits and no variables to set; without one each test skips
and says why. Every comparison is the parity rule: the fused result against the fp32 reference,
allowed twice the error of the reference computed in the same 16-bit dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from vit_fast import PRESETS, reference
from vit_fast.model import ViTClassifier
from vit_fast.testing import assert_parity

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: these shapes (and bf16 tl.dot) "
                          "are beyond the Triton interpreter; the CPU suite covers small shapes")
DTYPES = [torch.bfloat16, torch.float16]
DEVICE = "cuda"


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def _check(fused_fn, ref_fn, inputs, name, atol=1e-2):
    """Forward and every input gradient of fused_fn against ref_fn, by the parity rule."""
    out_shape = ref_fn(*inputs).shape
    grad_out = torch.randn(out_shape, device=DEVICE)
    out, grads = _grads(fused_fn, inputs, grad_out)
    out_pt, grads_pt = _grads(ref_fn, inputs, grad_out)
    out_ref, grads_ref = _grads(ref_fn, [t.float() for t in inputs], grad_out)
    assert_parity(out, out_pt, out_ref, atol=atol, name=f"{name} output")
    for i, (g, g_pt, g_ref) in enumerate(zip(grads, grads_pt, grads_ref)):
        assert_parity(g, g_pt, g_ref, atol=atol, name=f"{name} grad {i}")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_len", [65, 197, 577, 1025])
def test_attention_packed_large(dtype, seq_len):
    from vit_fast.fused import attention

    batch = 256 if seq_len == 65 else 4  # the CIFAR goal shape, then long sequences
    qkv = torch.randn(batch, seq_len, 3, 12, 64, device=DEVICE, dtype=dtype)
    _check(attention.attention_packed, reference.attention_packed, [qkv], f"attention N={seq_len}")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [192, 384, 768])
def test_add_layer_norm_large(dtype, width):
    from vit_fast.fused import layernorm

    rows = 512 * 65
    x, res = (torch.randn(rows, width, device=DEVICE, dtype=dtype) for _ in range(2))
    w = 1 + 0.1 * torch.randn(width, device=DEVICE, dtype=dtype)
    b = 0.1 * torch.randn(width, device=DEVICE, dtype=dtype)
    _check(lambda *a: layernorm.add_layer_norm(*a)[0] * 2 + layernorm.add_layer_norm(*a)[1],
           lambda *a: reference.add_layer_norm(*a)[0] * 2 + reference.add_layer_norm(*a)[1],
           [x, res, w, b], f"add_layer_norm width {width}")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim,ratio", [(192, 2), (192, 4), (384, 4)])
def test_mlp_large(dtype, dim, ratio):
    from vit_fast.fused import mlp

    M, hidden = 128 * 65, dim * ratio
    x, res = (torch.randn(M, dim, device=DEVICE, dtype=dtype) for _ in range(2))
    w1 = torch.randn(hidden, dim, device=DEVICE, dtype=dtype) / dim**0.5
    b1 = 0.1 * torch.randn(hidden, device=DEVICE, dtype=dtype)
    w2 = torch.randn(dim, hidden, device=DEVICE, dtype=dtype) / hidden**0.5
    b2 = 0.1 * torch.randn(dim, device=DEVICE, dtype=dtype)
    _check(lambda *a: mlp.mlp(*a[:5], "none", a[5]), lambda *a: reference.mlp(*a[:5], "none", a[5]),
           [x, w1, b1, w2, b2, res], f"mlp {dim}x{ratio}")


@cuda
@pytest.mark.parametrize("preset", ["vit-cifar", "vit-tiny"])
def test_fused_model_bf16_autocast_at_batch_128(preset):
    """A full-size training step of the fused model under bf16 autocast, against the reference
    under the same autocast (the same 16-bit rounding of its matmuls) and in fp32."""
    torch.manual_seed(0)
    model = ViTClassifier(PRESETS[preset]).to(DEVICE)
    images = torch.randn(128, 3, 32, 32, device=DEVICE)
    labels = torch.randint(100, (128,), device=DEVICE)

    def step(backend, amp):
        model.set_backend(backend).zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, g = step("fused", True)
    out_pt, g_pt = step("reference", True)
    out_ref, g_ref = step("reference", False)
    assert_parity(out, out_pt, out_ref, atol=1e-2, name="logits")
    for name in g_ref:
        assert_parity(g[name], g_pt[name], g_ref[name], atol=1e-3, name=f"grad {name}")
