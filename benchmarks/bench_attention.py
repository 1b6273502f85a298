"""Benchmark of the fused attention (vit_fast.fused.attention) against PyTorch's attentions.

Every provider starts from what a ViT block has in hand, the packed qkv projection output
(B, N, 3, H, D), and must deliver (B, N, H*D) for the output projection. All of them are
vit_fast.ops.attention_packed with a backend:
  fused              backend "fused": reads q, k, v through strides, writes (B, N, H*D) directly;
                     backward writes dqkv in (B, N, 3, H, D) directly
  reference          backend "reference" in eager mode (materialises softmax)
  torch.compile      the same reference under torch.compile
  torch              backend "torch": F.scaled_dot_product_attention on permuted (B, H, N, D)
                     views, as timm's Attention calls it, out.transpose(1, 2).reshape(B, N, H*D)
                     (a copy) out; SDPA picks its backend
  sdpa-<backend>     the torch provider restricted to one SDPA backend (flash, efficient, cudnn)
                     with torch.nn.attention.sdpa_kernel. Whatever copies SDPA makes of its
                     strided inputs, and the backward's copy of the output gradient, are part of
                     its time: that is the cost our layout avoids. A backend that rejects a shape
                     is recorded as unavailable.
Passes: forward (no grad) and forward + backward (dqkv from a fixed output gradient). Each row records
the fused op's configuration and kernel launches at its shape (`fused_launch_plan`).

FLOP model (the FlashAttention papers'): forward 4*B*H*N^2*D (the two matmuls QK^T and PV), the
backward 2.5x the forward (five matmuls, one of them recomputing QK^T), so forward + backward
3.5x. TFLOP/s and percent of the device's dense 16-bit peak follow from it; softmax and copies
are not counted.

Shapes: a sequence sweep N = 65 .. 4097 at about 16k tokens per batch (B = 16384 // N), and the
CIFAR shapes (N = 65) at batch 128, 256 and 512 for vit-small's heads (H = 6, D = 64) plus the
vit-cifar preset (H = 12, D = 16).

Goal (measured here on a GPU, never claimed before): at B = 256, N = 65, D = 64 the fused forward
+ backward is faster than every SDPA backend, their permute/transpose copies included.

Without a GPU nothing is timed: the script says so and runs a correctness smoke of the fused op
against the reference under TRITON_INTERPRET=1.

    python benchmarks/bench_attention.py [--quick] [--out-dir DIR] [--dtype bf16|fp16]
"""

from __future__ import annotations

import dataclasses

import torch

from vit_fast import benchmarking as common
from vit_fast.benchmarking import PASSES
from vit_fast import ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS_PER_BATCH = 16384
SEQ_LENS, QUICK_SEQ_LENS = (65, 197, 257, 577, 1025, 2049, 4097), (65, 1025)
CIFAR_SHAPES = [(128, 6, 64), (256, 6, 64), (512, 6, 64), (256, 12, 16)]  # (B, H, D) at N = 65
QUICK_CIFAR_SHAPES = [(256, 6, 64)]
GOAL_SHAPE = dict(batch=256, seq_len=65, heads=6, head_dim=64)


def flops(batch: int, heads: int, seq_len: int, head_dim: int) -> dict[str, float]:
    forward = 4.0 * batch * heads * seq_len**2 * head_dim
    return {"forward": forward, "forward_backward": 3.5 * forward}


def launch_plan(batch: int, heads: int, seq_len: int, head_dim: int, dtype) -> dict:
    """The fused op's configuration and kernel launches (forward, then backward) at this shape on
    a GPU, recorded beside each measurement so that a timing names the tiles it measured."""
    from vit_fast.fused import attention as fused_attention

    config = fused_attention.choose_config(head_dim=head_dim, seq_len=seq_len, dtype=dtype, interpret=False)
    launches = fused_attention.aot_launches(batch, seq_len, heads, head_dim, dtype)
    return {"config": dataclasses.asdict(config), "kernels": [launch.describe() for launch in launches]}


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def attention(backend: str):
    return lambda qkv: ops.attention_packed(qkv, 0.0, backend)


def sdpa_provider(backend):
    from torch.nn.attention import sdpa_kernel

    torch_attention = attention("torch")

    def run(qkv):
        with sdpa_kernel(backend):
            return torch_attention(qkv)

    return run


def all_providers() -> dict:
    table = common.providers(attention, compiled="reference")
    table.update({name: sdpa_provider(b) for name, b in sdpa_backends().items()})
    return table


def bench_shape(batch: int, heads: int, seq_len: int, head_dim: int, dtype, peaks: dict) -> dict:
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, seq_len, heads * head_dim, device="cuda", dtype=dtype)
    model = flops(batch, heads, seq_len, head_dim)
    row = {"batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "flops": model,
           "fused_launch_plan": launch_plan(batch, heads, seq_len, head_dim, dtype), "providers": {}, "unavailable": {}}
    expected = attention("reference")(qkv.detach().float()).to(dtype)
    for name, fn in all_providers().items():
        try:
            with torch.no_grad():
                out = fn(qkv)
            torch.autograd.grad(fn(qkv), qkv, grad_out)
        except RuntimeError as e:  # SDPA backend not built/supported for this GPU, dtype or shape
            if not name.startswith("sdpa-"):
                raise
            row["unavailable"][name] = str(e).splitlines()[0][:200]
            continue
        # A provider that is fast but wrong is not a result: check it once against fp32 math.
        err = (out.float() - expected.float()).abs().max().item()
        times = common.time_passes(fn, [qkv], [qkv], grad_out)
        row["providers"][name] = {"max_abs_error_vs_fp32": err,
                                  **common.with_rates(times, model, "tflops", 1e12, peaks["peak_tflops"], "pct_peak")}
        del out
    common.add_speedups(row)
    p = row["providers"]["fused"]
    speedups = ", ".join(f"x{s:.2f} vs {n}" for n, s in row["speedup_forward_backward"].items())
    print(f"B={batch:<4} H={heads:<2} N={seq_len:<5} D={head_dim:<3} fused fwd {p['forward']['ms']:.3f} ms "
          f"({p['forward']['tflops']:.0f} TFLOP/s), fwd+bwd {p['forward_backward']['ms']:.3f} ms "
          f"({p['forward_backward']['tflops']:.0f} TFLOP/s) | fwd+bwd {speedups}")
    for name, why in row["unavailable"].items():
        print(f"    {name} unavailable: {why}")
    return row


def goal_verdict(rows: list[dict]) -> dict | None:
    """The issue's goal, read off the measured CIFAR row: fused fwd+bwd faster than each SDPA backend."""
    for r in rows:
        if all(r[k] == v for k, v in (("batch", GOAL_SHAPE["batch"]), ("seq_len", GOAL_SHAPE["seq_len"]),
                                       ("heads", GOAL_SHAPE["heads"]), ("head_dim", GOAL_SHAPE["head_dim"]))):
            sdpa = {n: s for n, s in r["speedup_forward_backward"].items() if n.startswith("sdpa-")}
            verdict = {"shape": GOAL_SHAPE, "speedup_vs_sdpa": sdpa, "met": bool(sdpa) and min(sdpa.values()) > 1.0}
            print(f"goal (CIFAR fwd+bwd faster than every SDPA backend): "
                  f"{'MET' if verdict['met'] else 'NOT MET'} {sdpa}")
            return verdict
    return None


def run_gpu(args) -> dict:
    dtype = DTYPES[args.dtype]
    peaks = common.device_peaks()
    seq_rows = [bench_shape(max(1, TOKENS_PER_BATCH // n), 6, n, args.head_dim, dtype, peaks)
                for n in (QUICK_SEQ_LENS if args.quick else SEQ_LENS)]
    cifar_shapes = QUICK_CIFAR_SHAPES if args.quick else CIFAR_SHAPES
    cifar_rows = [bench_shape(b, h, 65, d, dtype, peaks) for b, h, d in cifar_shapes]
    for pass_name in PASSES:
        names = [n for n in seq_rows[0]["providers"] if all(n in r["providers"] for r in seq_rows)]
        common.plot_lines(args.out_dir / f"bench_attention_seq_{pass_name}.png", [r["seq_len"] for r in seq_rows],
                          {n: [r["providers"][n][pass_name]["tflops"] for r in seq_rows] for n in names},
                          "sequence length N", "TFLOP/s (FLOP model)",
                          f"attention {pass_name}, H=6, D={args.head_dim}, B*N~{TOKENS_PER_BATCH}, {args.dtype}", logx=True)
    cifar = [r for r in cifar_rows if (r["heads"], r["head_dim"]) == (6, 64)]
    if len(cifar) > 1:
        names = [n for n in cifar[0]["providers"] if all(n in r["providers"] for r in cifar)]
        common.plot_lines(args.out_dir / "bench_attention_cifar_forward_backward.png", [r["batch"] for r in cifar],
                          {n: [r["providers"][n]["forward_backward"]["ms"] for r in cifar] for n in names},
                          "batch (N = 65, H = 6, D = 64)", "forward + backward ms (lower is better)",
                          f"attention at the CIFAR shape, {args.dtype}", logx=True)
    return {"device": peaks, "dtype": args.dtype,
            "flop_model": "forward 4*B*H*N^2*D; backward 2.5x forward; forward_backward 3.5x forward",
            "sequence_sweep": seq_rows, "cifar": cifar_rows, "goal": goal_verdict(cifar_rows)}


def run_cpu(args) -> dict:
    """Fused vs the reference under the interpreter: fp16 by the parity rule, fp64 reference."""
    notice = common.no_gpu_notice("bench_attention")
    cases = [(2, 65, 2, 64)] if args.quick else [(2, 65, 2, 64), (1, 197, 2, 48), (3, 2, 1, 16)]
    checks, failures = [], []
    for batch, seq_len, heads, head_dim in cases:
        torch.manual_seed(0)
        master = [torch.randn(batch, seq_len, 3, heads, head_dim, dtype=torch.float64)]  # (B, N, 3, H, D)
        grad_out = [torch.randn(batch, seq_len, heads * head_dim, dtype=torch.float64)]  # (B, N, H*D)
        fused, same, wide = (common.outputs_and_grads(attention(backend), master, grad_out, dtype)
                             for backend, dtype in (("fused", torch.float16), ("reference", torch.float16),
                                                    ("reference", torch.float64)))
        errors, failed = common.parity_errors(["out", "dqkv"], fused, same, wide)
        failures += failed
        checks.append({"batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "ok": not failed,
                       "max_abs_error_vs_fp64": errors})
        print(f"B={batch} N={seq_len} H={heads} D={head_dim}: {'MISMATCH' if failed else 'OK'} (fp16, parity rule) "
              + ", ".join(f"{k} {v['fused']:.1e}/{v['reference_same_dtype']:.1e}" for k, v in errors.items()))
    sweep = [(max(1, TOKENS_PER_BATCH // n), 6, n, args.head_dim) for n in SEQ_LENS]
    model = {f"B={b} H={h} N={n} D={d}": flops(b, h, n, d) for b, h, n, d in sweep}
    model.update({f"B={b} H={h} N=65 D={d}": flops(b, h, 65, d) for b, h, d in CIFAR_SHAPES})
    plans = {f"B={b} H={h} N=65 D={d}": launch_plan(b, h, 65, d, DTYPES[args.dtype]) for b, h, d in CIFAR_SHAPES}
    return {"notice": notice, "smoke": checks, "failures": failures,
            "flop_model": {"rule": "forward 4*B*H*N^2*D; backward 2.5x forward", "shapes": model},
            "gpu_launch_plans": plans}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, "N in (65, 1025) and the CIFAR goal shape only; one smoke case", __file__)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim of the sequence sweep (default 64)")
    return common.run("bench_attention", parser.parse_args(argv), run_gpu, run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
