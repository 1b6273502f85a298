"""Fused attention (vit_fast.fused.attention) against the reference math and against PyTorch SDPA.

Without a GPU the real Triton kernels run under TRITON_INTERPRET=1 (see conftest.py); on a CUDA
machine the same tests run the compiled kernels. Shapes are the awkward ones a ViT meets: 1 and
2 tokens, 65 (CIFAR with 4x4 patches, one ragged tile past 64), 197 (ImageNet at 16x16 patches);
head dims 16, 48 (padded to 64 with masking), 64 and 128.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vit_fast import reference
from vit_fast.reference import split_qkv
from vit_fast.fused import attention as fused
from vit_fast.testing import (
    GPU_SIZED_REL, assert_compiled_matches_eager, assert_parity, assert_within_bound, attention_rounding_bounds,
    check_forward_backward_relative, gpu_sized_cases, gpu_sized_id,
)

ON_CUDA = torch.cuda.is_available()
# bf16 runs on the CPU too: under the interpreter the launcher has the kernels multiply bf16 tl.dot
# operands as fp32 and round casts to bf16 in software (INTERPRETING), since triton 3.8's
# interpreter returns garbage for a bf16 dot and truncates fp32 -> bf16.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (N, D): every test sequence length and head dim appears, including the CIFAR and ImageNet cases.
SHAPES = [(1, 16), (2, 48), (2, 128), (65, 16), (65, 64), (65, 128), (197, 48), (197, 128)]
# fp32 is compared directly with the fp64 reference; the error observed is ~5e-7.
FP32_TOL = dict(atol=5e-6, rtol=1e-5)


def _batch_heads(n: int) -> tuple[int, int]:
    return (2, 2) if n <= 65 else (1, 2)  # batch > 1 everywhere but the slowest interpreter case


def _packed_sdpa(qkv: torch.Tensor) -> torch.Tensor:
    """What an SDPA caller does with the packed projection: permute in, transpose out."""
    B, N, _, H, D = qkv.shape
    out = F.scaled_dot_product_attention(*reference.split_qkv(qkv))
    return out.transpose(1, 2).reshape(B, N, H * D)


PROVIDERS = {
    "plain": {"fused": fused.attention, "reference": reference.attention, "sdpa": F.scaled_dot_product_attention},
    "packed": {"fused": fused.attention_packed, "reference": reference.attention_packed, "sdpa": _packed_sdpa},
}


def _make_inputs(layout: str, B: int, H: int, N: int, D: int, dtype, device) -> list[torch.Tensor]:
    if layout == "packed":
        # The real producer: a qkv projection viewed per head, here with a row stride larger than
        # 3*H*D (a slice of a wider output) so that no stride can be taken for granted.
        wide = torch.randn(B, N, 3 * H * D + 8, device=device, dtype=dtype)
        return [wide[..., : 3 * H * D].view(B, N, 3, H, D)]
    # q, k, v as (B, H, N, D) views of (B, N, H, D) tensors: non-contiguous, last stride 1.
    return [torch.randn(B, N, H, D, device=device, dtype=dtype).transpose(1, 2) for _ in range(3)]


def _forward_backward(fn, inputs, grad, dtype=None):
    """out and input gradients of fn, on detached copies cast to dtype."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _check_against(provider_fn, layout, dtype, N, D, device, name):
    B, H = _batch_heads(N)
    inputs = _make_inputs(layout, B, H, N, D, dtype, device)
    grad = torch.randn_like(PROVIDERS[layout]["reference"](*inputs))
    out, grads = _forward_backward(PROVIDERS[layout]["fused"], inputs, grad)
    out_ref, grads_ref = _forward_backward(PROVIDERS[layout]["reference"], inputs, grad, torch.float64)
    if dtype == torch.float32:
        out_pt, grads_pt = _forward_backward(provider_fn, inputs, grad, torch.float32)
        torch.testing.assert_close(out.double(), out_ref, **FP32_TOL)
        torch.testing.assert_close(out, out_pt, **FP32_TOL)
        for g, g_pt, g_ref in zip(grads, grads_pt, grads_ref):
            torch.testing.assert_close(g.double(), g_ref, **FP32_TOL)
            torch.testing.assert_close(g, g_pt, **FP32_TOL)
    else:
        out_pt, grads_pt = _forward_backward(provider_fn, inputs, grad)  # same low precision
        assert_parity(out, out_pt, out_ref.to(torch.float32), name=f"{name} out")
        names = ("dq", "dk", "dv") if layout == "plain" else ("dqkv",)
        for gname, g, g_pt, g_ref in zip(names, grads, grads_pt, grads_ref):
            assert_parity(g, g_pt, g_ref.to(torch.float32), name=f"{name} {gname}")


# The interpreter's bf16 is as slow as its fp16: on the CPU bf16 skips the head dim 128 shapes,
# which fp16 covers there (same kernels, same tiles); a GPU runs bf16 at every shape.
_BF16_CPU_SKIPS = {(2, 128), (65, 128), (197, 128)}


@pytest.mark.parametrize("N,D", SHAPES)
@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_parity_vs_reference(dtype, layout, N, D, device):
    if dtype == torch.bfloat16 and device.type == "cpu" and (N, D) in _BF16_CPU_SKIPS:
        pytest.skip(f"bf16 at N={N}, D={D} runs on a GPU only (CI time); fp16 covers the shape in the interpreter")
    _check_against(PROVIDERS[layout]["reference"], layout, dtype, N, D, device, "vs reference")


@pytest.mark.parametrize("N,D", [(1, 16), (65, 64), (197, 48)])
@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_parity_vs_sdpa(dtype, layout, N, D, device):
    _check_against(PROVIDERS[layout]["sdpa"], layout, dtype, N, D, device, "vs SDPA")


@pytest.mark.parametrize("N,D", [(65, 16), (65, 64), (65, 128), (197, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_configs(dtype, N, D, device):
    """The configurations a GPU launch picks (at N = 65 small forward tiles and one dK/dV program
    per head that also computes delta and dQ at D <= 64, two 64-key programs and the dQ kernel at
    D = 128; 128 x 64 tiles beyond), run through the interpreter here: the suite's fixed
    interpreter tiles never cover them."""
    B, H = 2, 2
    cfg = fused.choose_config(D, N, dtype, interpret=False)
    if N <= fused.SINGLE_TILE_MAX_SEQ and dtype == torch.float16:  # fp32 has tiles of its own
        assert cfg.fuse_dq == (D <= 64) == (cfg.dkdv.block_n >= N)  # CIFAR: the backward is one launch
        assert len(fused.aot_launches(B, N, H, D, dtype)) == (2 if D <= 64 else 4)
    _check_config_against_reference(cfg, dtype, N, D, device)


@pytest.mark.parametrize("N", [1, 17, 65, 129])
@pytest.mark.parametrize("D", [16, 48])
def test_gpu_configs_bf16_awkward_lengths(N, D, device):
    """The bf16 (autocast) GPU configurations at lengths 1, 17, 65 (one query row past 64) and 129
    (past SINGLE_TILE_MAX_SEQ: the long-sequence tiles), D = 16 (vit-cifar) and 48 (padded to 64):
    the one-warp 16-row forward tiles and the 4-warp fused backward, run through the interpreter."""
    _check_config_against_reference(fused.choose_config(D, N, torch.bfloat16, interpret=False), torch.bfloat16,
                                    N, D, device)


def _check_config_against_reference(cfg, dtype, N, D, device):
    """Forward and backward with ``cfg`` on packed (B=2, H=2) inputs against the fp64 reference:
    fp32 within FP32_TOL, 16-bit by the parity rule."""
    B, H = 2, 2
    (qkv,) = _make_inputs("packed", B, H, N, D, dtype, device)
    scale = 1.0 / math.sqrt(D)
    q, k, v = split_qkv(qkv)
    out = torch.empty(B, N, H * D, device=device, dtype=dtype)
    lse = fused.launch_forward(q, k, v, fused._packed_out_view(out, H), scale, cfg)
    grad = torch.randn_like(out)
    dqkv = torch.empty_like(qkv)
    fused.launch_backward(
        fused._packed_out_view(grad, H), q, k, v, fused._packed_out_view(out, H), lse, scale,
        *split_qkv(dqkv), cfg,
    )
    out_ref, (dqkv_ref,) = _forward_backward(reference.attention_packed, [qkv], grad, torch.float64)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), out_ref, **FP32_TOL)
        torch.testing.assert_close(dqkv.double(), dqkv_ref, **FP32_TOL)
    else:
        out_pt, (dqkv_pt,) = _forward_backward(reference.attention_packed, [qkv], grad)
        assert_parity(out, out_pt, out_ref.float(), name="out")
        assert_parity(dqkv, dqkv_pt, dqkv_ref.float(), name="dqkv")


@pytest.mark.parametrize("preset", ["vit-cifar", "vit-small"])
def test_default_step_warps_own_distinct_rows(preset):
    """The training step's attention launches (bf16 autocast, N = 65, batch 128) give every warp
    rows of its own: the MMA's warp tile is 16 rows, so a forward tile of BLOCK_M query rows takes
    BLOCK_M / 16 warps (more would compute the same rows twice), and the fused backward's BLOCK_N
    key rows split evenly into 16-row multiples over its warps."""
    from vit_fast.config import get_preset
    from vit_fast.cost_kernels import GPU_TARGET_MULTIPROCESSORS
    from vit_fast.fused.launch import VIT_CIFAR_TOKENS, Target

    cfg = get_preset(preset)
    H, D = cfg.num_heads, cfg.dim // cfg.num_heads
    B, N = 128, VIT_CIFAR_TOKENS  # the default step: batch 128 of 32x32 images in 4x4 patches, plus CLS
    meta = dict(device="meta", dtype=torch.bfloat16)
    qkv = torch.empty(B, N, 3, H, D, **meta)
    out, lse = torch.empty(B, N, H * D, **meta), torch.empty(B, H, N, device="meta", dtype=torch.float32)
    target = Target(interpret=False, device_type="cuda", multiprocessors=GPU_TARGET_MULTIPROCESSORS)
    (fwd,) = fused.launch_plan("attention_packed", (qkv, D ** -0.5), (out, lse), target)
    assert fwd.constexprs["BLOCK_M"] == 16 * fwd.num_warps
    backward = fused.launch_plan("attention_packed_backward", (out, qkv, out, lse, D ** -0.5),
                                 (torch.empty_like(qkv),), target)
    assert [launch.kernel.fn.__name__ for launch in backward] == ["attention_bwd_dkdv_kernel"]  # one launch
    (dkdv,) = backward
    assert dkdv.constexprs["BLOCK_N"] >= N and dkdv.constexprs["BLOCK_N"] % (16 * dkdv.num_warps) == 0


def test_lse_is_row_logsumexp(device):
    B, H, N, D = 2, 2, 65, 48
    q, k, v = (torch.randn(B, H, N, D, device=device) for _ in range(3))
    q.requires_grad_()
    out, lse = torch.ops.vit_fast.attention(q, k, v, 0.3)
    assert out.requires_grad and not lse.requires_grad  # lse serves the backward, is not differentiated
    expected = torch.logsumexp(0.3 * q.double() @ k.double().transpose(-2, -1), dim=-1)
    torch.testing.assert_close(lse.double(), expected.detach(), **FP32_TOL)


# Extreme logits: the results are judged by attention_rounding_bounds, not by the parity rule. There
# a bound is twice the error of the reference computed in the same dtype; at |logits| ~ 1e2-1e4 that
# error comes from rounding the logits (fp32: ~1e-3 at 5e3; bf16: +-0.5 at 160), so in fp32 it is
# as large as the summation order of the CPU's BLAS happens to make it (fp32 at 5e3 failed on an
# AVX-512 machine: the dv bound 2.7e-4 there, against a fused error of 2.7e-3), and in 16 bits it
# is so large that the rule accepts a kernel that drops a key. The rounding bound is a worst case
# over summation orders, computed in fp64 from the inputs: the same on every machine.
GRAD_NAMES = ("out", "dq", "dk", "dv")


def _huge_logit_inputs(dtype, device):
    """q, k, v (1, 2, 65, 64) with logits (at scale 1) up to ~5e3 in magnitude."""
    B, H, N, D = 1, 2, 65, 64
    q = torch.randn(B, H, N, D, device=device, dtype=dtype) * 12.5
    k = torch.randn(B, H, N, D, device=device, dtype=dtype) * 12.5
    v = torch.randn(B, H, N, D, device=device, dtype=dtype)
    logits = q.double() @ k.double().transpose(-2, -1)
    assert logits.abs().max() > 5e3
    return [q, k, v]


def _extreme_rows_inputs(N: int, D: int, dtype, device):
    """q, k, v (1, 2, N, D) whose logits (at scale 1) are all about -160 in some rows, about +160
    in others, and of order 1 elsewhere. A row at -160 has lse ~ -156: exp2 of a padded key's
    logit (0) minus lse2 overflows fp32, so an unmasked padded key turns dQ into inf * 0 = NaN;
    real keys stay exact. The rows mix with ordinary ones in every query tile."""
    B, H = 1, 2
    q = 0.5 * torch.randn(B, H, N, D, device=device, dtype=torch.float64)
    k = 0.5 * torch.randn(B, H, N, D, device=device, dtype=torch.float64)
    v = torch.randn(B, H, N, D, device=device, dtype=torch.float64)
    k[..., 0] = 8.0  # every key shares a component along which q pushes the whole row
    q[..., 0] = 0.0
    q[:, :, 0::4, 0] = -20.0  # logits ~ -160 (and below -150 for every key)
    q[:, :, 2::4, 0] = 20.0  # logits ~ +160
    logits = q @ k.transpose(-2, -1)
    assert (logits[:, :, 0::4] < -150).all() and (logits[:, :, 2::4] > 150).all()
    return [t.to(dtype) for t in (q, k, v)]


def _exact_at_scale_1(inputs, grad):
    """out, dq, dk, dv of the reference in fp64 (the truth for inputs rounded to their dtype)."""
    out, grads = _forward_backward(lambda q, k, v: reference.attention(q, k, v, scale=1.0), inputs, grad, torch.float64)
    return dict(zip(GRAD_NAMES, (out, *grads)))


def _check_fused_at_scale_1(inputs, grad):
    """The fused out and gradients at scale 1: finite, and within the rounding bound of the truth."""
    attention = lambda q, k, v: fused.attention(q, k, v, scale=1.0)  # noqa: E731
    out, grads = _forward_backward(attention, inputs, grad)
    results = dict(zip(GRAD_NAMES, (out, *grads)))
    for name, t in results.items():
        assert torch.isfinite(t).all(), f"{name}: non-finite values at extreme logits"
    exact = _exact_at_scale_1(inputs, grad)
    bounds = attention_rounding_bounds(*inputs, grad, scale=1.0)
    for name in GRAD_NAMES:
        assert_within_bound(results[name], exact[name], bounds[name], name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_huge_logits_stay_finite(dtype, device):
    """Logits of magnitude ~5e3: without the running max, exp overflows to inf and gives NaN."""
    inputs = _huge_logit_inputs(dtype, device)
    _check_fused_at_scale_1(inputs, torch.randn_like(inputs[0]))


# The interpreter evaluates exp2 on every lane, masked ones included, and numpy warns when those
# overflow; the test is about exactly those lanes and asserts that no inf reaches a gradient.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("N", [30, 65], ids=["fused_dq", "dq_kernel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_extreme_logit_rows_backward(dtype, N, device):
    """Rows whose logits are all around -160 (or +160): finite gradients within the rounding
    bound of the fp64 reference, through the fused dK/dV+dQ kernel (N = 30: one key tile of 32 in
    the interpreter, 2 padded keys) and through the separate dQ kernel (N = 65: a ragged last key
    tile). This is the test that fails if either kernel stops masking padded keys out of P."""
    D = 16
    cfg = fused.choose_config(D, N, dtype)
    assert cfg.fuse_dq == (N == 30) or device.type == "cuda"
    assert N % cfg.dkdv.block_n != 0 and N % cfg.dq.block_n != 0  # padded keys in the last tile
    inputs = _extreme_rows_inputs(N, D, dtype, device)
    _check_fused_at_scale_1(inputs, torch.randn_like(inputs[0]))


def _masked_last_key(q, k, v):
    """The reference with the last key masked out of every row: what a kernel computes whose
    padding mask is off by one (offs_n < N_CTX - 1)."""
    s = q @ k.transpose(-2, -1)
    keep = torch.arange(k.shape[-2], device=k.device) < k.shape[-2] - 1
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("case,dtype", [("huge_logits", dt) for dt in (torch.float32, torch.float16)]
                         + [("extreme_rows", dt) for dt in DTYPES],
                         ids=["huge_logits-fp32", "huge_logits-fp16"] + [f"extreme_rows-{i}" for i in DTYPE_IDS])
def test_rounding_bound_rejects_a_masked_key(case, dtype, device):
    """Mutation test of the extreme-logit tests' check: the results of a kernel that masks the
    last key out (computed in fp64, then rounded to the dtype: no error but the mutation's) fail
    it, on out (the rows that attended to that key get another value row) and on dV (that key's
    gradient is zero). The parity rule, which the check replaced, let the bf16 mutant's out, dq and dk
    through."""
    inputs = _huge_logit_inputs(dtype, device) if case == "huge_logits" else _extreme_rows_inputs(65, 16, dtype, device)
    grad = torch.randn_like(inputs[0])
    out, grads = _forward_backward(_masked_last_key, inputs, grad, torch.float64)
    mutant = {name: t.to(dtype) for name, t in zip(GRAD_NAMES, (out, *grads))}
    exact = _exact_at_scale_1(inputs, grad)
    bounds = attention_rounding_bounds(*inputs, grad, scale=1.0)
    for name in ("out", "dv"):
        with pytest.raises(AssertionError, match=f"^{name}: error .* exceeds its rounding bound"):
            assert_within_bound(mutant[name], exact[name], bounds[name], name=name)


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_gradcheck_fp64(layout, device):
    """The real kernels in fp64 (fp64 accumulation too) against finite differences."""
    inputs = [x.double().requires_grad_() for x in _make_inputs(layout, 1, 1, 3, 8, torch.float64, device)]
    fn = PROVIDERS[layout]["fused"]
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs, scale=0.7), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("how", ["sum", "permuted", "sliced"])
def test_non_contiguous_incoming_grad(how, device):
    B, H, N, D = 2, 2, 65, 16
    (qkv,) = _make_inputs("packed", B, H, N, D, torch.float32, device)
    permuted = torch.randn(H * D, N, B, device=device).permute(2, 1, 0)  # (B, N, H*D), last stride B
    sliced = torch.randn(B, N, H * D + 8, device=device)[..., : H * D]  # last stride 1, rows padded
    grads = []
    for fn, dtype in ((fused.attention_packed, torch.float32), (reference.attention_packed, torch.float64)):
        leaf = qkv.detach().to(dtype).requires_grad_()
        out = fn(leaf)
        if how == "sum":
            out.sum().backward()  # the incoming gradient is expanded: every stride 0
        else:
            out.backward((permuted if how == "permuted" else sliced).to(dtype))  # .to keeps the strides
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0].double(), grads[1], **FP32_TOL)


def test_backward_is_deterministic(device):
    B, H, N, D = 2, 2, 65, 32  # several query and key tiles per head on every launch path
    (qkv,) = _make_inputs("packed", B, H, N, D, torch.float16, device)
    grad = torch.randn(B, N, H * D, device=device, dtype=torch.float16)
    first = _forward_backward(fused.attention_packed, [qkv], grad)
    second = _forward_backward(fused.attention_packed, [qkv], grad)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][0], second[1][0])


def test_opcheck(device):
    B, H, N, D = 1, 2, 33, 16
    q, k, v = (torch.randn(B, H, N, D, device=device, requires_grad=True) for _ in range(3))
    qkv = torch.randn(B, N, 3, H, D, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_fast.attention.default, (q, k, v, 0.25))
    torch.library.opcheck(torch.ops.vit_fast.attention_packed.default, (qkv, 0.25))
    with torch.no_grad():
        out, lse = torch.ops.vit_fast.attention(q, k, v, 0.25)
        pout, plse = torch.ops.vit_fast.attention_packed(qkv, 0.25)
    dout = torch.randn_like(out)
    ops = torch.ops.vit_fast
    torch.library.opcheck(ops.attention_backward.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.25))
    torch.library.opcheck(ops.attention_packed_backward.default, (torch.randn_like(pout), qkv.detach(), pout, plse, 0.25))


class _SelfAttention(torch.nn.Module):
    """timm's Attention block shape: qkv projection -> attention -> output projection."""

    def __init__(self, dim: int, heads: int, fn):
        super().__init__()
        self.heads, self.fn = heads, fn
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        return self.proj(self.fn(self.qkv(x).view(B, N, 3, self.heads, C // self.heads)))


def test_torch_compile_fullgraph_matches_eager(device):
    model = _SelfAttention(dim=32, heads=2, fn=fused.attention_packed).to(device)
    assert_compiled_matches_eager(model, torch.randn(2, 65, 32, device=device), **FP32_TOL)


def test_bad_inputs(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    with pytest.raises(ValueError, match="multiples of 8 up to 128, got 136"):
        fused.attention(*(torch.randn(1, 1, 4, 136, device=device) for _ in range(3)))
    with pytest.raises(ValueError, match="got 20"):
        fused.attention(*(torch.randn(1, 1, 4, 20, device=device) for _ in range(3)))
    with pytest.raises(ValueError, match="same shape"):
        fused.attention(q, q, torch.randn(1, 2, 6, 16, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        fused.attention(q, q, q.half())
    with pytest.raises(TypeError, match="int64"):
        fused.attention(*(torch.ones(1, 2, 5, 16, device=device, dtype=torch.int64) for _ in range(3)))
    with pytest.raises(ValueError, match=r"rank 4.*\(2, 5, 16\)"):
        fused.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, D\).*dim 2 is 2"):
        fused.attention_packed(torch.randn(1, 5, 2, 2, 16, device=device))
    with pytest.raises(ValueError, match="rank 5"):
        fused.attention_packed(q)
    wrong = torch.device("cpu") if device.type == "cuda" else torch.device("meta")
    with pytest.raises(ValueError, match=f"on {wrong}"):
        fused.attention(*(torch.randn(1, 2, 5, 16, device=wrong) for _ in range(3)))


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, device="meta", dtype=dtype)


def test_fake_implementations_check_inputs():
    """The registered ops' fake (meta) implementations refuse what the real ones refuse: called
    on meta tensors (or a mix of devices) they raise the same errors instead of returning tensors
    of a made-up shape. Each call below is wrong in exactly one way."""
    ops = torch.ops.vit_fast
    q, qkv = _meta(1, 2, 5, 16), _meta(1, 5, 3, 2, 16)
    lse = _meta(1, 2, 5, dtype=torch.float32)
    cases = [
        (ValueError, "same shape", ops.attention, (q, q, _meta(1, 2, 6, 16), 0.5)),
        (ValueError, "got 20", ops.attention, (_meta(1, 2, 5, 20),) * 3 + (0.5,)),
        (TypeError, "same dtype", ops.attention, (q, q, _meta(1, 2, 5, 16, dtype=torch.float32), 0.5)),
        (ValueError, r"dim 2 is 2", ops.attention_packed, (_meta(1, 5, 2, 2, 16), 0.5)),
        (ValueError, "rank 5", ops.attention_packed, (q, 0.5)),
        (ValueError, r"grad_out must have shape \(1, 2, 5, 16\)", ops.attention_backward,
         (_meta(1, 2, 4, 16), q, q, q, q, lse, 0.5)),
        (TypeError, "out has dtype torch.bfloat16 but q has torch.float16", ops.attention_backward, (q, q, q, q, _meta(1, 2, 5, 16, dtype=torch.bfloat16), lse, 0.5)),
        (TypeError, "lse has dtype torch.float16; expected torch.float32", ops.attention_backward,
         (q, q, q, q, q, _meta(1, 2, 5), 0.5)),
        (ValueError, r"lse must have shape \(B, H, N\) = \(1, 2, 5\)", ops.attention_packed_backward,
         (_meta(1, 5, 32), qkv, _meta(1, 5, 32), _meta(1, 5, 2, dtype=torch.float32), 0.5)),
        (ValueError, r"out must have shape \(1, 5, 32\)", ops.attention_packed_backward,
         (_meta(1, 5, 32), qkv, _meta(1, 5, 16), lse, 0.5)),
        # Well-formed, but on meta: a device no kernel runs on, refused like the real op refuses it.
        (ValueError, "on meta", ops.attention, (q, q, q, 0.5)),
        (ValueError, "is on cpu but q is on meta", ops.attention, (q, torch.empty(1, 2, 5, 16, dtype=torch.float16), q, 0.5)),
    ]
    for error, message, op, args in cases:
        with pytest.raises(error, match=message):
            op(*args)


def test_autocast_issues_no_cast_for_autocast_dtype_inputs():
    """Under autocast the qkv projection already returns the autocast dtype: the fused attention
    path (forward and backward, through vit_fast.ops as the model calls it) then dispatches no
    cast. An fp32 input is cast once, forward, and its gradient once back."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from vit_fast import ops

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    def casts(dtype):
        with FakeTensorMode(), Recorder() as recorder:
            qkv = torch.randn(2, 65, 3, 3, 16, dtype=dtype, requires_grad=True)  # (B, N, 3, H, D)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = ops.attention_packed(qkv, 0.0, "fused")
            assert out.dtype == torch.bfloat16
            out.backward(torch.ones_like(out))
            assert qkv.grad.dtype == dtype
        return [op for op in recorder.ops if op in ("_to_copy", "to", "copy_", "_autocast_to_reduced_precision")]

    assert casts(torch.bfloat16) == []
    assert casts(torch.float32) == ["_to_copy", "_to_copy"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the interpreter's fixed configuration; a GPU run uses choose_config's rules")
def test_interpreter_config_is_fixed():
    configs = {n: fused.choose_config(d, n, dt) for d in (16, 128) for n in (1, 32, 33, 65, 1025)
               for dt in (torch.float16, torch.float32)}
    assert {dataclasses.replace(c, fuse_dq=False) for c in configs.values()} == {fused._INTERPRETER_TILES}
    assert [n for n, c in configs.items() if c.fuse_dq] == [1, 32]  # only where one key tile covers N


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation: every configuration the launcher can pick, for sm_80 and sm_90
# ------------------------------------------------------------------------------------------------

AOT_HEAD_DIMS = (16, 32, 48, 64, 80, 128)  # 48 and 80 pad to BLOCK_D 64 and 128


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
def test_aot_every_config(dtype):
    """Every launch the code can pick, for head dims 16, 32, 64, 128 and 48, 80 (padded to 64 and
    128), forward and all backward kernels, compiles for sm_80 and sm_90 with no spills (neither
    LOCAL nor STACK bytes) and within both GPUs' shared memory: 16-bit, and fp32 (``--fused
    --no-amp`` trains in it) and fp64 (the CUDA path accepts it), whose FMA dots spilled before."""
    from vit_fast.aot import TARGETS, compile_launches

    for head_dim in AOT_HEAD_DIMS:  # the sweep over lengths below finds every configuration
        first_length = {fused.choose_config(head_dim, n, dtype, interpret=False): n
                        for n in range(fused.SINGLE_TILE_MAX_SEQ + 1, 0, -1)}
        assert set(first_length) == fused.all_configs(head_dim, dtype)
    # Launches of head dims that pad to the same BLOCK_D are identical (aot_every_config dedupes).
    launches = fused.aot_every_config(head_dims=AOT_HEAD_DIMS, dtypes=(dtype,))
    assert {launch.kernel for launch in launches} == {
        "attention_fwd_kernel", "attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"
    }
    assert {launch.constexprs["FUSE_DQ"] for launch in launches if "FUSE_DQ" in launch.constexprs} == {True, False}
    results = compile_launches(launches)
    assert len(results) == len(TARGETS) * len(launches)
    spills = [f"{launch.describe()} sm_{r.capability}: {r}" for launch, r in results
              if r.spill_bytes > 0 or r.stack_bytes > 0]
    too_big = [f"{launch.describe()} sm_{r.capability}: {r}" for launch, r in results if not r.fits_shared_memory]
    assert not spills, "register spills (LOCAL or STACK):\n" + "\n".join(spills)
    assert not too_big, "over the shared-memory limit:\n" + "\n".join(too_big)


# ---------------------------------------------------------------------------------------------
# GPU-sized case (vit_fast.testing.gpu_sized_cases: full size on CUDA, shrunken on the CPU)


# (batch, heads, seq_len): the CIFAR goal shape (batch 256 of 65 tokens), then long sequences. On
# the CPU one head of 197 tokens (several key tiles, the last one padded).
@pytest.mark.parametrize("device,dtype,shape", gpu_sized_cases([(256, 12, 65), (4, 12, 197), (4, 12, 577), (4, 12, 1025)],
                                                               [(1, 1, 197)]), ids=gpu_sized_id)
def test_attention_packed_large(device, dtype, shape):
    from vit_fast.fused import attention

    batch, heads, seq_len = shape
    qkv = torch.randn(batch, seq_len, 3, heads, 64, device=device, dtype=dtype)  # (B, N, 3, H, Dh)
    check_forward_backward_relative(attention.attention_packed, reference.attention_packed, [qkv], GPU_SIZED_REL,
                                    f"attention N={seq_len}")
