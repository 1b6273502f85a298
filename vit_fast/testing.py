"""Helpers shared by the parity tests and the benchmarks' correctness smoke runs, and the rounding-error
bounds that replace the parity rule where a same-dtype reference's error is a matter of luck."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(out: Tensor, out_pt: Tensor, out_ref: Tensor, atol: float = 1e-5, name: str = "output") -> None:
    """The parity rule of every fused op's 16-bit tests (the rule of FlashAttention's own tests).

    One fixed tolerance cannot serve fp16 and bf16 at every shape: loose enough for bf16, it
    would pass a broken fp16 kernel. So the fused error is judged against the error the same
    math makes when computed in the same low precision.

    ``out`` is the fused result, ``out_pt`` the reference computed in the same low precision,
    ``out_ref`` the reference in fp32 or fp64. The fused result may be at most twice as far from
    ``out_ref`` as the low-precision reference is, plus a small absolute slack.
    """
    _check_finite_and_shape(out, out_ref, name)
    err = max_abs_diff(out, out_ref)
    err_pt = max_abs_diff(out_pt, out_ref)
    assert err <= 2 * err_pt + atol, (
        f"{name}: fused max error {err:.3e} vs reference-in-same-dtype error {err_pt:.3e} "
        f"(allowed {2 * err_pt + atol:.3e})"
    )


def _check_finite_and_shape(out: Tensor, out_ref: Tensor, name: str) -> None:
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(out_ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the fused result"


def _scale(out_ref: Tensor, name: str) -> float:
    """max|reference|, which must be positive: against an all-zero reference a relative bound is
    zero wide and a parity bound is only the other reference's error, so the test has no teeth."""
    scale = out_ref.abs().max().item() if out_ref.numel() else 0.0
    assert scale > 0, f"{name}: the reference is all zero (max|ref| = {scale}); the comparison would have no teeth"
    return scale


def assert_close_relative(out: Tensor, out_ref: Tensor, rel: float, name: str = "output") -> None:
    """max|out - out_ref| <= rel * max|out_ref|: a tolerance that scales with each tensor.

    An absolute tolerance passes a tensor that is all wrong whenever the tensor is smaller than
    the tolerance (an all-zero gradient of a parameter whose gradient is below 1e-3 passes
    ``atol=1e-3``); with ``rel < 1`` a zeroed or sign-flipped result always fails.
    """
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1) for the bound to reject an all-zero result, got {rel}")
    _check_finite_and_shape(out, out_ref, name)
    scale = _scale(out_ref, name)
    err = max_abs_diff(out, out_ref)
    assert err <= rel * scale, (
        f"{name}: max error {err:.3e} exceeds {rel:g} x max|reference| = {rel * scale:.3e}"
    )


def assert_parity_relative(out: Tensor, out_pt: Tensor, out_ref: Tensor, rel: float, name: str = "output") -> None:
    """The parity rule with its slack relative to the tensor: the fused result ``out`` may be at
    most twice as far from ``out_ref`` (fp32/fp64) as ``out_pt`` (the reference in the same low
    precision as ``out``) is, plus ``rel * max|out_ref|``.

    The bound must stay below max|out_ref| itself, or an all-zero ``out`` would pass: when the
    same-precision reference is that far off, the comparison says nothing and this fails rather
    than pass vacuously.
    """
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1) for the bound to reject an all-zero result, got {rel}")
    _check_finite_and_shape(out, out_ref, name)
    scale = _scale(out_ref, name)
    err = max_abs_diff(out, out_ref)
    err_pt = max_abs_diff(out_pt, out_ref)
    allowed = 2 * err_pt + rel * scale
    assert allowed < scale, (
        f"{name}: the same-precision reference is off by {err_pt:.3e} of max|reference| {scale:.3e}, so the "
        f"parity bound {allowed:.3e} would accept an all-zero result; compare against a more precise baseline"
    )
    assert err <= allowed, (
        f"{name}: fused max error {err:.3e} vs reference-in-same-dtype error {err_pt:.3e} "
        f"(allowed 2 x that + {rel:g} x max|reference| {scale:.3e} = {allowed:.3e})"
    )


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the largest relative error of one rounding to nearest."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound, over ``|x|.|y|``, on the rounding error
    of a dot product of length n in ANY summation order (Accuracy and Stability of Numerical
    Algorithms, 2nd ed., eq. 3.5). Being order-free is the point: a bound built from it holds for
    every BLAS kernel, tile shape and SIMD width, where a measured same-dtype error holds for one."""
    if not 0 <= n * u < 1:
        raise ValueError(f"gamma_n needs n u < 1, got n = {n}, u = {u}")
    return n * u / (1 - n * u)


def assert_within_bound(out: Tensor, out_ref: Tensor, bound: Tensor, name: str = "output") -> None:
    """|out - out_ref| <= bound, element by element (``out_ref`` the fp64 truth, ``bound`` an error
    bound computed in fp64 from the inputs alone, such as ``attention_rounding_bounds``).

    Elementwise, so that an entry the bound pins down (a saturated softmax row, whose exact
    output is one value row) cannot hide behind the tensor's loosest entry. The bound must be
    below |out_ref| somewhere, or an all-zero result would pass: then this fails rather than pass
    vacuously.
    """
    _check_finite_and_shape(out, out_ref, name)
    assert bound.shape == out_ref.shape, f"{name}: bound shape {tuple(bound.shape)} != {tuple(out_ref.shape)}"
    ref, bound = out_ref.double(), bound.double()
    assert (ref.abs() > bound).any(), (
        f"{name}: the bound is at least |reference| everywhere, so it would accept an all-zero result")
    err = (out.double() - ref).abs()
    excess = err - bound
    at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    assert excess[at] <= 0, (
        f"{name}: error {err[at].item():.3e} at {at} exceeds its rounding bound {bound[at].item():.3e} "
        f"(reference {ref[at].item():.4e}, result {out[at].item():.4e}); max error {err.max().item():.3e}")


def attention_rounding_bounds(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, scale: float) -> dict[str, Tensor]:
    """Elementwise bounds on |fused - exact| for the fused attention's out, dq, dk and dv (keys of
    the dict), computed in fp64 from the inputs alone: first-order rounding-error analysis of the
    arithmetic of ``kernels/attention.py`` (FlashAttention-2: the backward recomputes P from the
    forward's stored log-sum-exp), with fp32 accumulation and q, k, v, grad_out in their dtype.

    Why not the parity rule: at |logits| ~ 1e3-1e4 an fp32 logit is off by up to ~1e-3 and the
    softmax of a near-tie row moves with it, so the fp32 reference's own error is set by the order
    in which the CPU's BLAS happens to sum, and a bound of twice that error holds on one CPU and
    not on another. In 16 bits the reference rounds the logits themselves (bf16 at 160: +-0.5),
    and twice its error accepts a kernel that drops a key. Every term below is a worst case over
    summation orders instead, so the bound is the same on every CPU and GPU.

    u is the accumulation's unit roundoff (2^-24; 2^-23 for 16-bit inputs, whose tensor-core sums
    may truncate), u_io that of the inputs' dtype, eta_io half its smallest subnormal; err(X)
    bounds |computed X - exact X|:

    - logits: err(s_ij) <= E_ij = gamma_D scale |q_i|.|k_j| + 2u |s_ij| (the dot product in any
      order; the product by the rounded constant scale * log2(e)). The forward, the dQ kernel
      (Q K^T tiles) and the dK/dV kernel (K Q^T tiles) each round their logits their own way.
    - the forward's P, normalised by its running sum: a softmax moves only with logit
      differences, so err(P_ij) / P_ij <= (1 - P_ij) E_ij + sum_{k != j} P_ik E_ik + sigma_ij,
      sigma_ij = gamma_2N (N terms, up to N rescalings by the running max) + 8u (exp2 and log2, 2
      ulp each on a GPU) + u |s_ij - lse_i|. This is the softmax's conditioning: ~0 on a
      saturated row, ~P(1 - P) E on a near-tie row.
    - the backward's P = exp2(s'_ij - lse2_i): s' is rounded independently of the logits lse came
      from, and lse2 is rounded three times at its own magnitude (m + log2 l; to natural log for
      storage; back), so err(P_ij) / P_ij <= E_ij + sum_k P_ik E_ik + 3u |lse_i| + sigma_ij on
      every row, saturated ones included. This term is the algorithm's, not the softmax's: a
      reference that normalises P has no such error, and at |logits| ~ 5e3 it is what dominates
      dV (P of saturated rows measured off by ~1e-3 relative).
    - P cast to the input dtype for the dots: u_io relative and eta_io absolute; exp2 may flush
      to zero below the accumulation's smallest normal: that much absolute.
    - O = P V / l and dV = P^T dO: err(P) |V| + gamma_2N+1 P |V| and the store, u_io |O| + eta_io.
    - dP = dO V^T: gamma_D |dO| |V|^T. Delta (rowsum(dO * O) from the stored O, or rowsum(P dP) /
      rowsum(P) in the one-launch backward): |dO|.err(O) + |P| err(dP) + gamma_max(N,D)+1 times
      the sums of absolute values.
    - dS = P (dP - Delta): err(P) |dP - Delta| + |P| (err(dP) + err(Delta)) + (2u + u_io) |dS|
      + eta_io; dQ = scale dS K and dK = scale dS^T Q: err(dS) |K| + gamma_2N+1 |dS| |K|, and the
      store.

    Products of two error terms are kept where they are cheap (|P| <= P + err(P); expm1 for
    exp's curvature); what is dropped is of order u^2 relative. The bound is loose where the
    logits are large (gamma_D is D u; a real dot product errs by ~sqrt(D) u), not where a kernel
    bug shows: a saturated row's output is pinned to within a few ulps of its one value row.
    """
    dtype = q.dtype
    u_io = unit_roundoff(dtype)
    eta_io = torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = unit_roundoff(acc) * (1 if dtype in (torch.float32, torch.float64) else 2)
    flushed = torch.finfo(acc).tiny
    q, k, v, do = (t.double() for t in (q, k, v, grad_out))
    N, D = q.shape[-2], q.shape[-1]
    kt, vt = k.transpose(-2, -1), v.transpose(-2, -1)
    s = scale * q @ kt
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse)
    pt = p.transpose(-2, -1)
    out, dp = p @ v, do @ vt
    delta = (do * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dst = ds.transpose(-2, -1)
    dq, dk, dv = scale * ds @ k, scale * dst @ q, pt @ do

    e = gamma(D, u) * scale * q.abs() @ kt.abs() + 2 * u * s.abs()
    e_mean = (p * e).sum(-1, keepdim=True)
    sigma = gamma(2 * N, u) + 8 * u + u * (s - lse).abs()
    floor = flushed + eta_io
    err_p_fwd = p * (torch.expm1((1 - p) * e + (e_mean - p * e).clamp_min(0) + sigma) + u_io) + floor
    err_p_bwd = p * (torch.expm1(e + e_mean + 3 * u * lse.abs() + sigma) + u_io) + floor
    p_bwd = p + err_p_bwd  # >= |the backward's P|

    err_out = err_p_fwd @ v.abs() + gamma(2 * N + 1, u) * p @ v.abs() + u_io * out.abs() + eta_io
    err_dv = err_p_bwd.transpose(-2, -1) @ do.abs() + gamma(2 * N, u) * pt @ do.abs() + u_io * dv.abs() + eta_io
    err_dp = gamma(D, u) * do.abs() @ vt.abs()
    err_delta = ((do.abs() * err_out).sum(-1, keepdim=True) + (p_bwd * err_dp).sum(-1, keepdim=True)
                 + gamma(max(N, D) + 1, u) * ((do * out).abs().sum(-1, keepdim=True)
                                                + (p_bwd * dp.abs()).sum(-1, keepdim=True)))
    err_ds = err_p_bwd * (dp - delta).abs() + p_bwd * (err_dp + err_delta) + (2 * u + u_io) * ds.abs() + eta_io
    err_dq = scale * (err_ds @ k.abs() + gamma(2 * N + 1, u) * ds.abs() @ k.abs()) + u_io * dq.abs() + eta_io
    err_dk = (scale * (err_ds.transpose(-2, -1) @ q.abs() + gamma(2 * N + 1, u) * dst.abs() @ q.abs())
              + u_io * dk.abs() + eta_io)
    return {"out": err_out, "dq": err_dq, "dk": err_dk, "dv": err_dv}


# E[delta^2] / u^2 for the relative rounding error delta of one fp add: the absolute error is uniform
# on +-half an ulp, and for the logarithmically distributed (Benford) significands m in [1, 2) that
# sums of random data have (Knuth, TAOCP vol. 2, 4.2.4), E[delta^2] = (u^2 / 3) E[1 / m^2]
# = (u^2 / 3) * 3 / (8 ln 2) = 0.180 u^2 (u^2 / 3 at worst, every significand at 1). Measured: 0.185
# (fp32, 9216 sums of 16384 random products in blocked and serial orders).
ROUNDING_VARIANCE = 1 / (8 * math.log(2))


def separating_depth(n: int) -> float:
    """The mean rounding depth halfway, on a log scale, between the best blocked order of n terms
    and one serial sum: sqrt(sqrt(n) * n / 2) = n^(3/4) / sqrt(2) (45 for n = 256, 1024 for 16384).

    A term's depth is the number of roundings its contribution passes through (the additions on
    its way to the result, plus its product's rounding, if any). One serial sum: n / 2 on average.
    Blocks of L terms summed serially, then the n / L block partials serially: L / 2 + n / (2 L),
    least for L = sqrt(n): sqrt(n). Pairwise: log2(n). For a mean depth d the rms error is
    sqrt(ROUNDING_VARIANCE * d) u |terms|_2 (``assert_summation_accuracy``), so a bound at this
    depth is n^(1/8) / 2^(1/4) times the best blocked order's rms error (1.7x for n = 256, 2.8x for
    16384), and the serial sum's is as many times the bound's."""
    return math.sqrt(math.sqrt(n) * n / 2)


def serial_sum(terms: Iterable[Tensor]) -> Tensor:
    """sum(terms) left to right from the first term, one rounding per addition in the terms' dtype.

    Elementwise adds only, no reduction kernel: a torch or BLAS reduction sums in an order of the
    library's (cascades, SIMD lanes, cache blocks, threads), which may differ between CPUs; this
    order is the same everywhere. For mutation tests: one serial sum is the order a blocked or
    pairwise summation exists to avoid."""
    iterator = iter(terms)
    total = next(iterator).clone()
    for term in iterator:
        total += term
    return total


def summation_error_ratios(out: Tensor, out_ref: Tensor, term_sq_sums: Tensor, depth: float,
                           max_factor: float = 8.0) -> tuple[float, float]:
    """(rms z / sqrt(c d), max z / (max_factor sqrt(c d))), z = |out - out_ref| / (u |terms|_2)
    element by element, c = ROUNDING_VARIANCE, d = ``depth``: each at most 1 in
    ``assert_summation_accuracy``, whose docstring says why."""
    _check_finite_and_shape(out, out_ref, "sum")
    assert term_sq_sums.shape == out_ref.shape and bool((term_sq_sums > 0).all()), (
        "term_sq_sums must hold each output's positive sum of squared terms")
    u = unit_roundoff(out.dtype)
    z = (out.double() - out_ref.double()).abs() / (u * term_sq_sums.double().sqrt())
    allowed = math.sqrt(ROUNDING_VARIANCE * depth)
    return z.square().mean().sqrt().item() / allowed, z.max().item() / (max_factor * allowed)


def assert_summation_accuracy(out: Tensor, out_ref: Tensor, term_sq_sums: Tensor, depth: float,
                              name: str = "output", max_factor: float = 8.0) -> None:
    """``out`` (sums of many terms of random sign, each output one sum) is as accurate as a
    summation order whose mean rounding depth is at most ``depth`` (``separating_depth``):
    ``out_ref`` is the exact sums (fp64), ``term_sq_sums`` each output's sum of squared terms.

    First-order error of any summation tree: out - exact = sum_k delta_k s_k over its additions k
    (s_k the exact partial sum the addition forms, |delta_k| <= u), plus eps_i x_i for each rounded
    product x_i. With the deltas independent, of mean zero and E delta^2 = c u^2
    (c = ROUNDING_VARIANCE), and terms of random sign, E (out - exact)^2 = c u^2 sum_i depth_i x_i^2:
    z = |out - exact| / (u |terms|_2) has mean square c times the terms' mean depth. Measured (fp32,
    c = 0.18): 16384 products in blocks of 256 then 64 partials (depth 161) rms z 5.47, predicted
    5.38; serial (8193) 38.9 vs 38.4; pairwise (15) 1.74 vs 1.64; 256 values in chunks of 16 (16)
    1.84 vs 1.70, serial (128) 4.85 vs 4.80.

    So the checks, with a = sqrt(c depth):
    - rms z <= a: the order's accuracy. Over thousands of outputs the rms is a steady statistic
      (it moved by under 4% over six seeds; by 16% over 192 outputs), so it tells orders apart by
      their depths: ``separating_depth`` puts the bound between a blocked order and a serial sum.
    - max z <= max_factor a: no output far off. Given its partial sums an output's error is
      Gaussian, but how large those grow varies between outputs (a serial sum's sum of squared
      partial sums spreads like a chi-square of few degrees of freedom), so the largest of ~10^4
      |z| measured 3 to 10 times their rms (blocked, pairwise and serial orders, six seeds): an
      order with rms z up to 0.8 a passes max_factor 8 (blocked orders at 0.7-0.9 a came to
      0.57-0.84 of the max bound). It is a guard; the rms check is the order's test.

    Nothing here depends on a library's summation order: only the exact sums (fp64, which moves z
    by under 1e-7) and the inputs. The model needs terms of random sign (test data from randn):
    terms of one sign make partial sums, and every order's error, grow with n.
    """
    rms_ratio, max_ratio = summation_error_ratios(out, out_ref, term_sq_sums, depth, max_factor)
    allowed = math.sqrt(ROUNDING_VARIANCE * depth)
    assert rms_ratio <= 1, (
        f"{name}: rms error {rms_ratio * allowed:.2f} u |terms|_2 exceeds {allowed:.2f}, that of a summation order "
        f"of mean rounding depth {depth:.0f} (one serial sum: a mean depth of n / 2)")
    assert max_ratio <= 1, (
        f"{name}: max error {max_ratio * max_factor * allowed:.1f} u |terms|_2 exceeds {max_factor:g} x {allowed:.2f}, "
        f"{max_factor:g} times the rms error of a summation order of mean rounding depth {depth:.0f}")


def default_device() -> torch.device:
    """CUDA when present, else the CPU (where Triton kernels run in Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def devices() -> list[torch.device]:
    """Devices for a test's ``device`` parametrization: the CPU always (Triton kernels in the
    interpreter, the patch embedding in the extension's C++ twin), then CUDA when present. A GPU
    test body that also runs on the CPU has its setup, shapes and tolerances proven on machines
    without a GPU, before a GPU ever runs it."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def assert_compiled_matches_eager(module: torch.nn.Module, x: Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """``torch.compile(module, fullgraph=True)`` gives the eager output, and the eager gradients of
    the input and of every parameter (through ``out.square().sum()``): our custom ops must be
    opaque, traceable nodes for Dynamo, forward and backward."""
    torch._dynamo.reset()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def run(fn):
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        grads = torch.autograd.grad(out.float().square().sum(), [xi, *(p for _, p in named)])
        return out.detach(), grads

    out_eager, grads_eager = run(module)
    out_compiled, grads_compiled = run(torch.compile(module, fullgraph=True))
    torch.testing.assert_close(out_compiled, out_eager, rtol=rtol, atol=atol)
    for name, c, e in zip(["input", *(n for n, _ in named)], grads_compiled, grads_eager):
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"gradient of {name}: {m}")


# ----------------------------------------------------------------------------- GPU-sized cases
# Each op's test file has a case at the sizes a GPU trains at (the CIFAR goal shapes, long
# sequences, wide rows, bf16 through tl.dot, a whole-model step at batch 128 under 16-bit
# autocast). Its body runs on every device of ``devices()``: on CUDA at those sizes, on the CPU
# (Triton interpreter, the patch embedding's C++ twin) at shrunken sizes that keep each case's
# structure (several key tiles with a padded last one; the ViT widths), so the set-up, the shapes
# and the tolerances are proven on machines without a GPU before a GPU runs them.

# Slack beyond the parity rule, as a fraction of each tensor's largest value: bf16 keeps 8
# significant bits (a rounding is up to 0.4% of the value), so 1% is about two roundings of the
# largest element, far below the 100% error of a zeroed or unwritten result.
GPU_SIZED_REL = 1e-2
GPU_SIZED_DTYPES = (torch.bfloat16, torch.float16)


def gpu_sized_cases(gpu_cases: list, cpu_cases: list) -> list[tuple[torch.device, torch.dtype, object]]:
    """(device, dtype, case) triples: the GPU sizes on CUDA, their shrunken twins on the CPU, each
    in bf16 and fp16. bf16 runs on the CPU too: the fused ops widen bf16 dot operands to fp32 under
    Triton's interpreter (whose own bf16 tl.dot is broken, upstream triton issue 11584)."""
    return [(device, dtype, case) for device in devices() for dtype in GPU_SIZED_DTYPES
            for case in (gpu_cases if device.type == "cuda" else cpu_cases)]


def gpu_sized_id(value) -> str:
    """A readable pytest id for each element of a ``gpu_sized_cases`` triple."""
    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, torch.dtype):
        return str(value)[6:]
    return str(value)


def check_forward_backward_relative(fused_fn, ref_fn, inputs: list[torch.Tensor], rel: float, name: str) -> None:
    """The output and every input gradient of ``fused_fn`` against ``ref_fn`` by the relative
    parity rule (``assert_parity_relative``): ``ref_fn`` in the inputs' 16-bit dtype is the
    like-for-like baseline, ``ref_fn`` in fp32 the truth. An all-zero or garbage tensor is 100% off
    and fails."""
    def grads(fn, tensors, grad_out):
        tensors = [x.detach().clone().requires_grad_(True) for x in tensors]
        out = fn(*tensors)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), [x.grad for x in tensors]

    grad_out = torch.randn(ref_fn(*inputs).shape, device=inputs[0].device)
    out, g = grads(fused_fn, inputs, grad_out)
    out_pt, g_pt = grads(ref_fn, inputs, grad_out)
    out_ref, g_ref = grads(ref_fn, [x.float() for x in inputs], grad_out)
    assert_parity_relative(out, out_pt, out_ref, rel, name=f"{name} output")
    for i, (a, b, c) in enumerate(zip(g, g_pt, g_ref)):
        assert a.dtype == b.dtype, f"{name} grad {i}: dtype {a.dtype}, expected {b.dtype}"
        assert_parity_relative(a, b, c, rel, name=f"{name} grad {i}")



def assert_same_batches(loader, other, epochs: Iterable[int] = (0, 1)) -> int:
    """Two training loaders (``vit_fast.loader.DeviceLoader``) yield the same batches, bit for bit,
    over ``epochs``: images, targets and the targets' dtype. Returns the batches compared."""
    batches = 0
    for epoch in epochs:
        loader.set_epoch(epoch)
        other.set_epoch(epoch)
        for (x, y), (xo, yo) in zip(loader, other, strict=True):
            assert torch.equal(xo, x), f"epoch {epoch} batch {batches}: max difference {(xo - x).abs().max():.3g}"
            assert torch.equal(yo, y) and yo.dtype == y.dtype, f"epoch {epoch} batch {batches}: targets differ"
            batches += 1
    return batches
