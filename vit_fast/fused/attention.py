"""Fused attention as torch ops: ``vit_fast::attention`` and ``vit_fast::attention_packed``.

Both ops run the Triton kernels of ``vit_fast.kernels.attention`` on (B, H, N, D) strided views:
the plain op on q, k, v themselves, the packed op on views into the qkv projection output
(B, N, 3, H, D), with its output written straight into (B, N, H*D) and its gradient straight into
one (B, N, 3, H, D) tensor. No permute, transpose or contiguous copy happens on either path.

Public API (matches ``vit_fast.reference.attention`` / ``attention_packed``):
    attention(q, k, v, scale=None)      q, k, v (B, H, N, D) -> (B, H, N, D)
    attention_packed(qkv, scale=None)   qkv (B, N, 3, H, D)  -> (B, N, H*D)
    aot_launches(batch, seq_len, heads, head_dim, dtype, packed=True)   the GPU's kernel launches,
                                        for the ahead-of-time compile tests (vit_fast.aot)
    aot_every_config(head_dims, dtypes) the launches of every configuration choose_config can
                                        return (python -m vit_fast.aot --op attention reports them)
    KernelConfig, AttentionConfig, choose_config(head_dim, seq_len, dtype, *, interpret=None), all_configs
    launch_forward(...), launch_backward(...)   run the kernels on (B, H, N, D) views with a given config
    launch_plan(op, args, outputs, target)   the launches of one call of a registered op (run by the op,
                                        counted by vit_fast.cost)

Registered ops (custom_op + register_fake + register_autograd, so they pass opcheck and trace
under torch.compile(fullgraph=True); the forward ops return the row log-sum-exp the backward
needs as a second, non-differentiable output; real and fake implementations run the same
shape, dtype and device checks). A backward is one launch (the dK/dV kernel computing delta and
dQ too) where one program covers a head's keys, else three (delta, dK/dV, dQ):
    vit_fast::attention(q, k, v, scale) -> (out, lse)
    vit_fast::attention_backward(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)
    vit_fast::attention_packed(qkv, scale) -> (out, lse)
    vit_fast::attention_packed_backward(grad_out, qkv, out, lse, scale) -> dqkv

One module of about 600 lines, on purpose: the two layouts are one op on two sets of strides, so
they share the tile choice (``choose_config``, whose table of configurations is most of the
length), the launch builders and the backward; splitting them by layout would split those.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import triton
from torch import Tensor

from vit_fast.fused.launch import (
    SUPPORTED_DTYPES,
    VIT_CIFAR_TOKENS,
    KernelConfig,
    Launch,
    accumulation_dtype,
    check_launchable,
    check_same_device,
    check_same_dtype_device,
    interpreting,
    meta_tensor,
    Target,
    precision_constexprs,
)
from vit_fast.kernels.attention import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_bwd_preprocess_kernel,
    attention_fwd_kernel,
)
from vit_fast.reference import split_qkv

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

MAX_HEAD_DIM = 128

# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """One launch configuration per kernel of a forward + backward pass: block_m query rows and
    block_n keys per tile, num_stages the software-pipelining depth of the tile loop."""

    forward: KernelConfig  # block_m queries owned per program, block_n keys per loop step
    preprocess: KernelConfig  # delta = rowsum(dO * O); only block_m is used
    dkdv: KernelConfig  # block_n keys owned per program, block_m queries per loop step
    dq: KernelConfig  # block_m queries owned per program, block_n keys per loop step
    # The dK/dV program holds every key of its head (dkdv.block_n >= N), so it also computes
    # delta and completes dQ: the preprocess and dQ kernels are not launched.
    fuse_dq: bool = False


_PREPROCESS = KernelConfig(block_m=64, block_n=0, num_warps=4, num_stages=1)  # delta = rowsum(dO * O)

# In Triton's interpreter the numbers only shape the arithmetic, so the tiles are fixed, small
# and asymmetric: BLOCK_M != BLOCK_N catches mixed-up masks, and 32-wide key tiles make every test
# sequence length above 32 (65, 197) run several tiles with a ragged last one, while N = 1 and 2
# take the fused-dQ path.
_INTERPRETER_TILES = AttentionConfig(
    forward=KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1),
    preprocess=KernelConfig(block_m=32, block_n=0, num_warps=4, num_stages=1),
    dkdv=KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1),
    dq=KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1),
)

SINGLE_TILE_MAX_SEQ = 128  # up to this length one dK/dV program can own every key of a head


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the minimum tl.dot operand size)."""
    return max(16, triton.next_power_of_2(head_dim))


def _short_sequence_config(bd: int, seq_len: int) -> AttentionConfig:
    """16-bit tiles for N <= SINGLE_TILE_MAX_SEQ, sized for ViT on CIFAR (N = 65, head dims 16-64).

    mma.sync computes 16-row warp tiles, and Triton lays a dot's warps along its rows first: a tile
    of BLOCK_M rows with more than BLOCK_M / 16 warps has warps computing the same rows twice (the
    former 32-row forward tile with 4 warps, ``warpsPerCTA = [4, 1]``, did each row twice). So the
    forward takes 16 query rows and one warp per program, streaming keys 16 at a time: at N = 65 a
    head is 5 programs of 80 x 80 logits (66% real), read K and V from L2, and a one-warp CTA needs
    no barrier between warps. By SASS instruction count per head (loop body x trips + the rest,
    times warps and programs) that is the cheapest of the tiles tried: 32 rows with 2 warps, 64
    with 4 (two programs, the second one row), 16 with 32-key steps.

    The backward needs one program per head to own all keys (block_n = 64 or 128 >= N): it then
    completes dQ and computes delta itself (fuse_dq), one launch for the whole backward. Its query
    step is 16 rows (80 padded rows at N = 65, where 32 gives 96). Its keys are the dots' rows
    (dV = P^T dO and dK = dS^T Q): at head dim 16, 128 keys take 2 warps of 64 rows. Each warp's
    loop is longer than with 4 warps of 32 (585 instructions, not 450: four 16-row mma tiles
    instead of two), but the parts every warp repeats (the q, dO and lse loads, the 16-row dQ
    product, the cross-warp reductions of delta) are done by half as many warps, so the SASS counts
    per head fall by a third (table below); 214 registers (sm_90, 220 on sm_80) still leave 4 CTAs,
    8 warps, per SM, enough for the 1536 programs to be about 3 waves on 132 SMs, as before. One
    warp of 128 rows needs a 264-byte stack frame on sm_90; 32-query steps (3 trips instead of 5)
    cost more per query than they save (4 warps: 11424 warp-instructions per head; 2 warps:
    7828, with an 8-byte stack frame). The 16-row dQ product is still repeated by each warp:
    splitting it into per-warp partial products summed across warps (tried with 4 warps) cost more
    instructions and barriers than the repeated HMMAs. At head dims 32-64, 128 keys keep 8 warps:
    4 take 230-255 registers on sm_80, whose layout then spreads the warps over the 16 queries.
    At BLOCK_D = 128 the k, v, dk and dv of 128 keys do not fit one program's registers: there it
    owns 64 keys (fused up to N = 64, else two programs per head and the dQ kernel).

    SASS counts of the default step (vit-cifar, batch 128, bf16, N = 65, head dim 16; 1536 heads),
    compiled with ``vit_fast.aot`` and read with ``cuobjdump -sass``, sm_90 (sm_80 alike unless
    noted); per loop iteration; warp-instructions per head = programs x warps x (loop x trips +
    the rest). Nothing has run on a GPU: the times are estimates (issue-bound, one instruction per
    cycle per scheduler on 132 SMs x 4 schedulers at 1.98 GHz, H100 SXM; latency not hidden
    would add to them).

    =================  ======================  ======================  ==========================  ==========================
    kernel             tile, warps, grid       warpsPerCTA (mma)       loop: instr/HMMA/BAR/SHFL   warp-instr/head, estimate
    =================  ======================  ======================  ==========================  ==========================
    forward, before    32 x 16, 4, 4608        [4, 1] (rows twice)     126 / 4 / 2 / 8, 5 trips    12000, 17.6 us
    forward, after     16 x 16, 1, 7680        [1, 1]                  122 / 4 / 2 / 8, 5 trips    4840, 7.1 us
    backward, before   128 keys x 16, 8, 1536  [8, 1]; dQ [8, 1]       367 / 20 / 10 / 48, 5 trips 17856, 26.2 us
    backward, 4 warps  128 keys x 16, 4, 1536  [4, 1]; dQ [4, 1]       450 / 24 / 7 / 40, 5 trips  10976, 16.1 us
    backward, now      128 keys x 16, 2, 1536  [2, 1]; dQ [2, 1]       585 / 48 / 7 / 32, 5 trips  7064, 10.4 us
    =================  ======================  ======================  ==========================  ==========================

    (The "mma" column counts HMMA instructions as ``vit_fast.sass`` does. vit_fast.gpu_time's
    estimate of the backward, which adds latency, barriers and residency, goes from 25.0 us per
    launch with 4 warps to 16.8 us with 2, against the target of 2 x (6.8 us floor + 2 us launch).
    Backward on sm_80: 372 / 24 / 13 / 48 before, 421 / 32 / 7 / 40 with 4 warps, 591 / 48 / 7 /
    32 with 2, 10192 and 7128 warp-instructions per head. The loads of q, dO and
    lse in the backward loop: 2 LDG + 1 LDGSTS before, 3 LDGSTS issued a stage ahead after.) At
    head dim 64 (vit-tiny, vit-small) the forward goes from 32 x 32 tiles with 4 warps laid
    ``[1, 4]`` across the keys (237 instructions, 7 BAR, 32 SHFL per iteration, 3 trips; 14808
    warp-instructions per head) to 16 x 16 with one warp (212, 2 BAR, 8 SHFL, 5 trips; 8200); its
    backward is unchanged. The floors at head dim 16 (estimates): 13 MB moved forward and 23 MB
    backward at 3.35 TB/s, 3.9 and 6.8 us per layer.
    """
    bn = 64 if seq_len <= 64 else 128
    forward = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=2)
    dkdv_n = bn if bd <= 64 else 64
    if (dkdv_n == 128 and bd > 16) or dkdv_n * bd >= 64 * 128:
        dkdv_warps = 8
    else:  # 128 keys at head dim 16 (N = 65): 2 warps of 64 keys, see the table above
        dkdv_warps = 2 if dkdv_n == 128 else 4
    dkdv = KernelConfig(block_m=16 if bd <= 64 else 32, block_n=dkdv_n, num_warps=dkdv_warps, num_stages=2)
    # dQ (used where not fused: BLOCK_D = 128 and N > 64) keeps q, dO and dq beside the fp32 S and
    # dP tiles: 64 x 64 with 8 warps compiles without spills on both targets.
    dq = KernelConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    return AttentionConfig(forward, _PREPROCESS, dkdv, dq, fuse_dq=dkdv_n >= seq_len)


def _fp32_config(bd: int, seq_len: int) -> AttentionConfig:
    """fp32 (``--no-amp``): every dot runs on FMA units ("ieee"), whose operand layouts hold a
    thread's rows over the whole head dim in registers. Query tiles of 16 rows keep that
    spill-free on sm_80 and sm_90 (32-row forward tiles spilled 232-376 bytes of stack at
    BLOCK_D >= 64); at BLOCK_D = 128 the forward's key tile halves and the dK/dV and dQ programs
    take 8 warps for the same reason (4-warp dK/dV tiles left 16-256 bytes of stack there). At
    BLOCK_D = 16 the dK/dV program takes 2 warps: with 4 (sm_90) or 8 (sm_80) ptxas left an 8-16
    byte stack frame in the fused variant."""
    warps = 4 if bd <= 64 else 8
    forward = KernelConfig(block_m=16, block_n=32 if bd <= 64 else 16, num_warps=4, num_stages=1)
    dkdv = KernelConfig(block_m=16, block_n=32, num_warps=2 if bd == 16 else warps, num_stages=1)
    dq = KernelConfig(block_m=32, block_n=32, num_warps=warps, num_stages=1)
    return AttentionConfig(forward, _PREPROCESS, dkdv, dq, fuse_dq=dkdv.block_n >= seq_len)


def choose_config(head_dim: int, seq_len: int, dtype: torch.dtype, *,
                  interpret: bool | None = None) -> AttentionConfig:
    """Launch configuration from head dim, sequence length and dtype (no autotuning: the
    interpreter cannot run it, and timings would depend on the first shape seen).

    - 16-bit, N <= SINGLE_TILE_MAX_SEQ: small tiles for ViT's short sequences, one backward
      launch where one dK/dV program covers the sequence (``_short_sequence_config``).
    - 16-bit, longer sequences: 128 x 64 forward tiles (the FlashAttention-2 / Triton-tutorial
      shape), 64-key dK/dV tiles stepping 32 queries, 64 x 64 dQ tiles, 8 warps at BLOCK_D = 128.
    - fp32: ``_fp32_config``; fp64 (gradcheck): 16 x 16 tiles, its dots run on FMA units through
      shared memory; fused only up to BLOCK_D = 64, where the fused dK/dV spilled at 128.
    - Every configuration compiles without spills (LOCAL and STACK) on sm_80 and sm_90, checked
      by tests/test_attention.py::test_aot_every_config; the choices are unmeasured until
      bench_attention.py runs on a GPU.
    - In the interpreter (``interpret``, default ``launch.interpreting()``) the tiles are fixed
      (_INTERPRETER_TILES).
    """
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return dataclasses.replace(_INTERPRETER_TILES, fuse_dq=seq_len <= _INTERPRETER_TILES.dkdv.block_n)
    bd = block_d(head_dim)
    if dtype == torch.float64:
        tile = KernelConfig(16, 16, num_warps=4, num_stages=1)
        return AttentionConfig(tile, _PREPROCESS, tile, tile, fuse_dq=seq_len <= 16 and bd <= 64)
    if dtype == torch.float32:
        return _fp32_config(bd, seq_len)
    if seq_len <= SINGLE_TILE_MAX_SEQ:
        return _short_sequence_config(bd, seq_len)
    warps = 8 if bd >= 128 else 4
    return AttentionConfig(
        forward=KernelConfig(128, 64, num_warps=warps, num_stages=3),
        preprocess=_PREPROCESS,
        dkdv=KernelConfig(block_m=32, block_n=64, num_warps=warps, num_stages=2),
        dq=KernelConfig(block_m=64, block_n=64, num_warps=warps, num_stages=2),
    )


def all_configs(head_dim: int, dtype: torch.dtype) -> set[AttentionConfig]:
    """Every configuration ``choose_config`` can return for this head dim and dtype on a GPU.

    The choice depends on the sequence length only up to SINGLE_TILE_MAX_SEQ + 1, so sweeping
    1..SINGLE_TILE_MAX_SEQ + 1 enumerates them all (the ahead-of-time test compiles each). The
    dQ kernel's configuration is included even where fuse_dq makes it unused.
    """
    return {choose_config(head_dim=head_dim, seq_len=n, dtype=dtype, interpret=False)
            for n in range(1, SINGLE_TILE_MAX_SEQ + 2)}


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_head_dim(head_dim: int) -> None:
    if head_dim > MAX_HEAD_DIM or head_dim % 8 != 0 or head_dim <= 0:
        raise ValueError(
            f"fused attention supports head dims that are positive multiples of 8 up to {MAX_HEAD_DIM}, "
            f"got {head_dim}"
        )


def _check_rank(name: str, t: Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} (rank {rank}), got shape {tuple(t.shape)}")


# Every check reads metadata only, so the fake implementations run them too. Shapes are checked
# before dtypes and devices, so that a wrong shape is reported as such on any device (meta too).


def _check_qkv_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rank(name, t, 4, "(B, H, N, D)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape (B, H, N, D), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_head_dim(q.shape[-1])


def _check_packed_shape(qkv: Tensor) -> None:
    _check_rank("qkv", qkv, 5, "(B, N, 3, H, D)")
    if qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)} (dim 2 is {qkv.shape[2]}, expected 3)"
        )
    _check_head_dim(qkv.shape[-1])


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    _check_qkv_shapes(q, k, v)
    check_same_dtype_device({"q": q, "k": k, "v": v})


def _check_packed(qkv: Tensor) -> None:
    _check_packed_shape(qkv)
    check_same_dtype_device({"qkv": qkv})


def _check_saved(tensors: dict[str, Tensor], shape: tuple, lse: Tensor, B: int, H: int, N: int) -> None:
    """The backward's other inputs: grad_out and out of ``shape`` and lse of (B, H, N), then one
    dtype and device for all (the first entry's), lse in its accumulation dtype."""
    for name, t in list(tensors.items())[-2:]:  # grad_out, out
        _check_rank(name, t, len(shape), str(shape))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check_rank("lse", lse, 3, "(B, H, N)")
    if tuple(lse.shape) != (B, H, N):
        raise ValueError(f"lse must have shape (B, H, N) = {(B, H, N)}, got {tuple(lse.shape)}")
    first_name, first = next(iter(tensors.items()))
    expected = accumulation_dtype(first.dtype)
    if lse.dtype != expected:
        raise TypeError(f"lse has dtype {lse.dtype}; expected {expected} for {first.dtype} inputs")
    check_same_dtype_device(tensors)
    check_same_device({first_name: first, "lse": lse})


def _check_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> None:
    _check_qkv_shapes(q, k, v)
    _check_saved(dict(q=q, k=k, v=v, grad_out=grad_out, out=out), tuple(q.shape), lse, *q.shape[:3])


def _check_packed_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor) -> None:
    _check_packed_shape(qkv)
    B, N, _, H, D = qkv.shape
    _check_saved(dict(qkv=qkv, grad_out=grad_out, out=out), (B, N, H * D), lse, B, H, N)


def _autocast_input(t: Tensor) -> Tensor:
    """What autocast would hand a matmul: under autocast on the tensor's device type, fp32 (or
    the other 16-bit dtype) becomes the autocast dtype; fp64 is left alone, as autocast leaves it.
    Under autocast the qkv projection already returns the autocast dtype, so on the model's path
    this returns its input and issues no cast kernel."""
    device_type = t.device.type
    if not torch.is_autocast_enabled(device_type) or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    dtype = torch.get_autocast_dtype(device_type)
    return t if t.dtype == dtype else t.to(dtype)


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# Launchers: every tensor is a (B, H, N, D) view whose last stride is 1
# ----------------------------------------------------------------------------------------------


def _unit_last_stride(t: Tensor) -> Tensor:
    """The kernels need stride 1 on the head dim (vectorised loads). Projection outputs have it;
    incoming gradients may not (``out.sum().backward()`` hands over an expanded, stride-0 tensor),
    and those are copied here, deliberately and only then."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dtype_constexprs(dtype: torch.dtype, interpret: bool) -> dict:
    """ACC_DTYPE, INPUT_PRECISION and INTERPRETING (under Triton's interpreter the kernels widen
    bf16 dots and round bf16 casts in software: ``kernels/attention.py``). A GPU launch, and so
    every ahead-of-time compile, keeps bf16 dots and the hardware conversion."""
    return {**precision_constexprs(dtype), "INTERPRETING": interpret}


def _stride_args(name: str, t: Tensor) -> dict:
    """stride_<name>b, _<name>h, _<name>n of a (B, H, N, D) view (its head-dim stride is 1)."""
    return {f"stride_{name}{dim}": t.stride(i) for i, dim in enumerate("bhn")}


def _forward_launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                    config: AttentionConfig, interpret: bool) -> Launch:
    B, H, N, D = q.shape
    cfg = config.forward
    args = dict(
        Q=q, K=k, V=v, Out=out, LSE=lse,
        **_stride_args("q", q), **_stride_args("k", k), **_stride_args("v", v), **_stride_args("o", out),
        H=H, N_CTX=N, HEAD_DIM=D, sm_scale=scale,
    )
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(D),
                      **_dtype_constexprs(q.dtype, interpret))
    return Launch(attention_fwd_kernel, (triton.cdiv(N, cfg.block_m) * B * H,), args, constexprs,
                  cfg.num_warps, cfg.num_stages)


def launch_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float, config: AttentionConfig | None = None
) -> Tensor:
    """out <- softmax(q k^T * scale) v on (B, H, N, D) views with a given config (tests); returns lse (B, H, N)."""
    B, H, N, D = q.shape
    lse = torch.empty((B, H, N), device=q.device, dtype=accumulation_dtype(q.dtype))
    config = config or choose_config(head_dim=D, seq_len=N, dtype=q.dtype)
    _forward_launch(q, k, v, out, lse, scale, config, interpreting()).run()
    return lse


def _backward_launches(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    dq: Tensor, dk: Tensor, dv: Tensor, config: AttentionConfig, interpret: bool,
) -> list[Launch]:
    """The backward's launches in order. With fuse_dq (one dK/dV program per head) that is the
    dK/dV kernel alone, which computes delta and dQ itself; otherwise delta = rowsum(dO * O),
    dK/dV, then dQ. Allocates delta where it is a tensor of its own."""
    B, H, N, D = q.shape
    dtypes = _dtype_constexprs(q.dtype, interpret)
    bd = block_d(D)
    shape_args = dict(H=H, N_CTX=N, HEAD_DIM=D)
    c = config.dkdv
    if config.fuse_dq and c.block_n < N:
        raise ValueError(f"fuse_dq needs one key tile per head: dkdv.block_n={c.block_n} < N={N}")
    launches = []
    if config.fuse_dq:
        delta = lse  # never read by the fused kernel: any (B, H, N) tensor of the right dtype
    else:
        delta = torch.empty_like(lse)
        pre = config.preprocess
        launches.append(Launch(
            attention_bwd_preprocess_kernel, (triton.cdiv(N, pre.block_m) * B * H,),
            dict(Out=out, dOut=grad_out, Delta=delta, **_stride_args("o", out), **_stride_args("do", grad_out),
                 **shape_args),
            dict(BLOCK_M=pre.block_m, BLOCK_D=bd, ACC_DTYPE=dtypes["ACC_DTYPE"]),
            pre.num_warps, pre.num_stages,
        ))
    inputs = dict(Q=q, K=k, V=v, dOut=grad_out)
    input_strides = {**_stride_args("q", q), **_stride_args("k", k), **_stride_args("v", v),
                     **_stride_args("do", grad_out)}
    launches.append(Launch(
        attention_bwd_dkdv_kernel, (triton.cdiv(N, c.block_n) * B * H,),
        dict(**inputs, dK=dk, dV=dv, dQ=dq, LSE=lse, Delta=delta, **input_strides, **_stride_args("dk", dk),
             **_stride_args("dv", dv), **_stride_args("dq", dq), **shape_args, sm_scale=scale),
        dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd, FUSE_DQ=config.fuse_dq, **dtypes),
        c.num_warps, c.num_stages,
    ))
    if not config.fuse_dq:
        c = config.dq
        launches.append(Launch(
            attention_bwd_dq_kernel, (triton.cdiv(N, c.block_m) * B * H,),
            dict(**inputs, dQ=dq, LSE=lse, Delta=delta, **input_strides, **_stride_args("dq", dq), **shape_args,
                 sm_scale=scale),
            dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd, **dtypes),
            c.num_warps, c.num_stages,
        ))
    return launches


def launch_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    dq: Tensor, dk: Tensor, dv: Tensor, config: AttentionConfig | None = None,
) -> None:
    """dq, dk, dv <- gradients of the attention on (B, H, N, D) views (written, not accumulated)."""
    _, _, N, D = q.shape
    config = config or choose_config(head_dim=D, seq_len=N, dtype=q.dtype)
    for launch in _backward_launches(grad_out, q, k, v, out, lse, scale, dq, dk, dv, config, interpreting()):
        launch.run()


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::<op>`` (attention, attention_backward,
    attention_packed, attention_packed_backward) with ``args`` (the op's arguments, in its schema's
    order) writing ``outputs`` (what the op returns), on ``target``. The real implementations run
    them; ``vit_fast.cost`` counts them. Copies an input whose head dim is strided (as the op does)."""
    interpret = target.interpret

    def config(q: Tensor) -> AttentionConfig:
        return choose_config(head_dim=q.shape[-1], seq_len=q.shape[2], dtype=q.dtype, interpret=interpret)

    if op == "attention":
        q, k, v, scale = args
        out, lse = outputs
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        return [_forward_launch(q, k, v, out, lse, scale, config(q), interpret)]
    if op == "attention_backward":
        grad_out, q, k, v, out, lse, scale = args
        dq, dk, dv = outputs
        grad_out, q, k, v = (_unit_last_stride(t) for t in (grad_out, q, k, v))
        return _backward_launches(grad_out, q, k, v, out, lse, scale, dq, dk, dv, config(q), interpret)
    if op == "attention_packed":
        qkv, scale = args
        out, lse = outputs
        qkv = _unit_last_stride(qkv)
        q, k, v = split_qkv(qkv)
        return [_forward_launch(q, k, v, _packed_out_view(out, qkv.shape[3]), lse, scale, config(q), interpret)]
    if op == "attention_packed_backward":
        grad_out, qkv, out, lse, scale = args
        (dqkv,) = outputs
        grad_out, qkv = _unit_last_stride(grad_out), _unit_last_stride(qkv)
        H = qkv.shape[3]
        q, k, v = split_qkv(qkv)
        # dq, dk, dv are written into the one (B, N, 3, H, D) gradient through strides.
        return _backward_launches(_packed_out_view(grad_out, H), q, k, v, _packed_out_view(out, H), lse, scale,
                                  *split_qkv(dqkv), config(q), interpret)
    raise ValueError(f"vit_fast::{op} is not an attention op")


def _run(op: str, args: tuple, outputs: tuple, device_of: Tensor) -> None:
    for launch in launch_plan(op, args, outputs, Target.of(device_of)):
        launch.run()


def _packed_out_view(out: Tensor, H: int) -> Tensor:
    """(B, N, H*D) -> (B, H, N, D) view of the same memory."""
    B, N, HD = out.shape
    return out.view(B, N, H, HD // H).transpose(1, 2)


def aot_launches(batch: int, seq_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                 packed: bool = True) -> list[KernelLaunch]:
    """The kernels a GPU runs for one forward and backward of ``attention_packed`` (``packed``:
    views into a (B, N, 3, H, D) qkv tensor, output and gradient (B, N, H*D)) or of ``attention``
    (contiguous (B, H, N, D) tensors) at these sizes, with the GPU's configuration choice."""
    _check_head_dim(head_dim)
    config = choose_config(head_dim=head_dim, seq_len=seq_len, dtype=dtype, interpret=False)

    t = partial(meta_tensor, dtype=dtype)
    B, N, H, D = batch, seq_len, heads, head_dim
    if packed:
        q, k, v = split_qkv(t(B, N, 3, H, D))
        out, grad_out = (_packed_out_view(t(B, N, H * D), H) for _ in range(2))
        dq, dk, dv = split_qkv(t(B, N, 3, H, D))
    else:
        q, k, v, out, grad_out, dq, dk, dv = (t(B, H, N, D) for _ in range(8))
    lse = t(B, H, N, dtype=accumulation_dtype(dtype))
    scale = _resolve_scale(None, D)
    launches = [_forward_launch(q, k, v, out, lse, scale, config, interpret=False)]
    launches += _backward_launches(grad_out, q, k, v, out, lse, scale, dq, dk, dv, config, interpret=False)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


AOT_HEAD_DIMS = (16, 32, 64, 128)  # one per BLOCK_D: head dims padding to the same BLOCK_D launch the same kernels


def aot_every_config(head_dims: tuple[int, ...] = AOT_HEAD_DIMS,
                     dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES) -> list[KernelLaunch]:
    """The distinct launches of every configuration ``choose_config`` can return on a GPU, for
    these head dims and dtypes (what ``python -m vit_fast.aot --op attention`` reports and the
    ahead-of-time test compiles): per configuration the shortest and the longest sequence length
    that pick it (N = 1 compiles apart: Triton specialises an argument equal to 1), plus the CIFAR
    ViT's 65 tokens and 197 (ImageNet ViT-B/16). The dQ kernel is compiled where it runs."""
    launches = []
    for dtype in dtypes:
        for head_dim in head_dims:
            lengths = {VIT_CIFAR_TOKENS, 197}
            for config in all_configs(head_dim, dtype):
                picked = [n for n in range(1, SINGLE_TILE_MAX_SEQ + 2)
                          if choose_config(head_dim=head_dim, seq_len=n, dtype=dtype, interpret=False) == config]
                lengths |= {picked[0], picked[-1]}
            for n in sorted(lengths):
                launches += aot_launches(2, n, 3, head_dim, dtype)
    return list({launch.key: launch for launch in launches}.values())


# ----------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("vit_fast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    _check_qkv(q, k, v)
    check_launchable("q", q)
    B, H, N, _ = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=accumulation_dtype(q.dtype))
    _run("attention", (q, k, v, scale), (out, lse), q)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, scale):
    _check_qkv(q, k, v)
    B, H, N, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("vit_fast::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    _check_backward(grad_out, q, k, v, out, lse)
    check_launchable("q", q)
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    _run("attention_backward", (grad_out, q, k, v, out, lse, scale), (dq, dk, dv), q)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    _check_backward(grad_out, q, k, v, out, lse)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    # lse is a by-product for the backward, not differentiable; and with no materialised grads
    # autograd launches no zero-fill for its (absent) gradient on every backward.
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:  # the output's gradient is undefined (zero): so are the inputs'
        return None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("vit_fast::attention_packed", mutates_args=())
def _attention_packed_op(qkv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    _check_packed(qkv)
    check_launchable("qkv", qkv)
    B, N, _, H, D = qkv.shape
    out = torch.empty((B, N, H * D), device=qkv.device, dtype=qkv.dtype)  # ready for the projection
    lse = torch.empty((B, H, N), device=qkv.device, dtype=accumulation_dtype(qkv.dtype))
    _run("attention_packed", (qkv, scale), (out, lse), qkv)
    return out, lse


@_attention_packed_op.register_fake
def _(qkv, scale):
    _check_packed(qkv)
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B, H, N), dtype=accumulation_dtype(qkv.dtype))


@torch.library.custom_op("vit_fast::attention_packed_backward", mutates_args=())
def _attention_packed_backward_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float) -> Tensor:
    _check_packed_backward(grad_out, qkv, out, lse)
    check_launchable("qkv", qkv)
    # One (B, N, 3, H, D) gradient, the layout of qkv: dq, dk, dv are written into it through
    # strides, so it flows back into the qkv projection with no cat or copy.
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    _run("attention_packed_backward", (grad_out, qkv, out, lse, scale), (dqkv,), qkv)
    return dqkv


@_attention_packed_backward_op.register_fake
def _(grad_out, qkv, out, lse, scale):
    _check_packed_backward(grad_out, qkv, out, lse)
    return qkv.new_empty(qkv.shape)


def _attention_packed_setup_context(ctx, inputs, output):
    qkv, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _attention_packed_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return None, None
    qkv, out, lse = ctx.saved_tensors
    return _attention_packed_backward_op(grad_out, qkv, out, lse, ctx.scale), None


_attention_packed_op.register_autograd(_attention_packed_backward, setup_context=_attention_packed_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v for q, k, v of shape (B, H, N, D); scale defaults to 1/sqrt(D).

    Same contract as ``vit_fast.reference.attention`` (without dropout). D must be a multiple of 8
    up to 128; fp16, bf16 (fp32 accumulation), fp32 and fp64. Under autocast, inputs not already
    in the autocast dtype are cast to it (fp64 excepted, as autocast does).
    """
    _check_qkv(q, k, v)
    q, k, v = (_autocast_input(t) for t in (q, k, v))
    out, _ = _attention_op(q, k, v, _resolve_scale(scale, q.shape[-1]))
    return out


def attention_packed(qkv: Tensor, scale: float | None = None) -> Tensor:
    """Attention read from the packed projection output (B, N, 3, H, D), as produced by
    ``linear(x).view(B, N, 3, H, D)``; returns (B, N, H*D), ready for the output projection.

    Same contract as ``vit_fast.reference.attention_packed`` (without dropout); autocast as in
    ``attention``: the model's qkv projection already returns the autocast dtype, so no cast runs.
    """
    _check_packed(qkv)
    out, _ = _attention_packed_op(_autocast_input(qkv), _resolve_scale(scale, qkv.shape[-1]))
    return out
