"""Benchmark of the fused transformer MLP (vit_fast.fused.mlp) against eager PyTorch and torch.compile.

Providers, side by side in one process, all computing residual + fc2(GELU(fc1(x))) with the
same parameters:
  fused          vit_fast.fused.mlp: Triton fc1+bias+GELU, fc2+bias+residual; backward with the
                 GELU derivative fused into dY W2 (pre-activation recomputed) and cuBLAS for the rest
  eager          nn.Linear -> nn.GELU -> nn.Linear, + residual, in eager mode (the issue's
                 "reference" provider: what a PyTorch user writes)
  torch.compile  the same module under torch.compile
Passes: forward (no grad), and forward + backward (gradients of x, the residual and all four
parameters: the training step).

FLOP model: forward 2*M*(D*Hd)*2 (two GEMMs of M x D x Hd), backward twice that; M = B*65
tokens (CIFAR, 4x4 patches + class token), D the width, Hd = ratio*D. TFLOP/s and percent of the
device's dense 16-bit peak are read from it (bias, GELU and residual FLOPs are not counted).

The breakdown (--breakdown) times the fused pieces against the cuBLAS GEMM of the same shape, to
confirm or overturn two design choices made without a GPU: recomputing the pre-activation in the
GELU backward kernel (kernels/mlp.py) and leaving the weight/input gradients to cuBLAS.

The goal (measured here, never claimed before): forward+backward at least 1.2x faster than
eager and not slower than torch.compile at the CIFAR shapes.

Without a GPU nothing is timed; the script checks the fused MLP against vit_fast.reference.mlp
under TRITON_INTERPRET=1 (forward and every gradient, at a CIFAR width) and reports the model.

    python benchmarks/bench_mlp.py [--quick] [--breakdown] [--out-dir DIR] [--dtype bf16|fp16]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

if not torch.cuda.is_available():
    # The smoke runs the Triton kernels in the interpreter; it must be set before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vit_fast import reference  # noqa: E402
from vit_fast.fused import mlp as fused  # noqa: E402
from vit_fast.testing import assert_parity  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = 65  # 8x8 patches of a 32x32 image + the class token
BATCHES, QUICK_BATCHES = (128, 256, 512), (256,)
WIDTHS, QUICK_WIDTHS = (192, 384), (192,)
RATIOS, QUICK_RATIOS = (2, 4), (4,)
PASSES = ("forward", "forward_backward")


class EagerMlp(nn.Module):
    """residual + fc2(GELU(fc1(x))) from nn modules: the eager and torch.compile providers."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, residual):
        return residual + self.fc2(self.act(self.fc1(x)))


def fused_provider(module: EagerMlp):
    def run(x, residual):
        return fused.mlp(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias,
                         approximate=module.act.approximate, residual=residual)

    return run


def flops(m: int, d: int, hidden: int) -> dict[str, float]:
    forward = 2.0 * m * (d * hidden) * 2
    return {"forward": forward, "forward_backward": 3 * forward}


def run_gpu(args) -> dict:
    dtype = DTYPES[args.dtype]
    peaks = common.device_peaks()
    results, breakdowns = [], []
    for d in QUICK_WIDTHS if args.quick else WIDTHS:
        for ratio in QUICK_RATIOS if args.quick else RATIOS:
            hidden = d * ratio
            for batch in QUICK_BATCHES if args.quick else BATCHES:
                m = batch * TOKENS
                module = EagerMlp(d, hidden).to(device="cuda", dtype=dtype)
                # A fresh compile per shape: dynamo's per-function recompile limit (8) would
                # otherwise silently run later shapes in eager mode under the torch.compile label.
                torch._dynamo.reset()
                providers = {
                    "fused": fused_provider(module),
                    "eager": module,
                    "torch.compile": torch.compile(module, dynamic=False),
                }
                x = torch.randn(batch, TOKENS, d, device="cuda", dtype=dtype, requires_grad=True)
                residual = torch.randn_like(x, requires_grad=True)
                grad_out = torch.randn_like(x)
                leaves = [x, residual, *module.parameters()]
                model = flops(m, d, hidden)
                row = {"dim": d, "ratio": ratio, "batch": batch, "tokens": m, "flops": model, "providers": {}}
                for name, fn in providers.items():
                    with torch.no_grad():
                        fwd = common.time_cuda(lambda: fn(x, residual))
                    fwd_bwd = common.time_cuda(lambda: torch.autograd.grad(fn(x, residual), leaves, grad_out))
                    entry = {}
                    for pass_name, t in zip(PASSES, (fwd, fwd_bwd)):
                        tflops = model[pass_name] / (t["ms"] * 1e-3) / 1e12
                        entry[pass_name] = {**t, "tflops": tflops,
                                            "pct_peak": 100 * tflops / peaks["peak_tflops"] if peaks["peak_tflops"] else None}
                    row["providers"][name] = entry
                for pass_name in PASSES:
                    fused_ms = row["providers"]["fused"][pass_name]["ms"]
                    row[f"speedup_{pass_name}"] = {
                        name: e[pass_name]["ms"] / fused_ms for name, e in row["providers"].items() if name != "fused"
                    }
                results.append(row)
                p, s = row["providers"], row["speedup_forward_backward"]
                print(
                    f"D={d:<4} ratio={ratio} B={batch:<4} fwd+bwd: fused {p['fused']['forward_backward']['ms']:.3f} ms "
                    f"({p['fused']['forward_backward']['tflops']:.0f} TFLOP/s), x{s['eager']:.2f} vs eager "
                    f"(goal >= 1.2), x{s['torch.compile']:.2f} vs torch.compile (goal >= 1.0) | fwd: "
                    f"x{row['speedup_forward']['eager']:.2f} vs eager"
                )
                if args.breakdown:
                    breakdowns.append(breakdown(module, x, grad_out, d, hidden))
    plot(args, results)
    return {"device": peaks, "dtype": args.dtype, "results": results, "breakdown": breakdowns,
            "goal": "forward_backward speedup >= 1.2 vs eager and >= 1.0 vs torch.compile"}


def breakdown(module: EagerMlp, x, grad_out, d: int, hidden: int) -> dict:
    """Each fused kernel beside the plain cuBLAS GEMM of the same (M, N, K)."""
    x2d, gy2d = x.detach().reshape(-1, d), grad_out.reshape(-1, d)
    w1, b1, w2, b2 = (p.detach() for p in (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias))
    h = torch.nn.functional.linear(x2d, w1, b1)  # any (M, Hd) tensor of the right shape
    act = "gelu" if module.act.approximate == "none" else "gelu_tanh"
    times = {
        # fc1 with bias + GELU in the epilogue vs the bare GEMM: the epilogue's cost.
        "fused_fc1_gelu": common.time_cuda(lambda: fused._linear_fwd(x2d, w1, b1, None, act)),
        "cublas_fc1": common.time_cuda(lambda: x2d @ w1.t()),
        # dY W2 * GELU'(recomputed pre) vs the bare dY W2: the recompute's cost. Saving the
        # pre-activation instead would cost the bare GEMM + reading (M, Hd) + writing it in fc1.
        "fused_gelu_bwd": common.time_cuda(lambda: fused._gelu_bwd(gy2d, x2d, w1, b1, w2, act)),
        "cublas_dy_w2": common.time_cuda(lambda: gy2d @ w2),
        "read_write_hidden": common.time_cuda(lambda: h.clone()),  # moves 2 * M*Hd elements
        # The GEMMs left to cuBLAS.
        "cublas_dx": common.time_cuda(lambda: h @ w1),
        "cublas_dw1": common.time_cuda(lambda: h.t() @ x2d),
        "cublas_dw2": common.time_cuda(lambda: gy2d.t() @ h),
    }
    ms = {k: v["ms"] for k, v in times.items()}
    print("  breakdown (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return {"dim": d, "hidden": hidden, "tokens": x2d.shape[0], "ms": ms, "timings": times}


def plot(args, results: list[dict]) -> None:
    out_dir = Path(args.out_dir or common.RESULTS_DIR)
    for d in sorted({r["dim"] for r in results}):
        for ratio in sorted({r["ratio"] for r in results}):
            rows = [r for r in results if r["dim"] == d and r["ratio"] == ratio]
            if len(rows) < 2:
                continue
            for pass_name in PASSES:
                series = {name: [r["providers"][name][pass_name]["tflops"] for r in rows] for name in rows[0]["providers"]}
                common.plot_lines(out_dir / f"bench_mlp_d{d}_r{ratio}_{pass_name}.png", [r["tokens"] for r in rows],
                                  series, "tokens M = batch x 65", "TFLOP/s (FLOP model)",
                                  f"MLP {pass_name}, D={d}, hidden={d * ratio}, {args.dtype}", logx=True)


def run_cpu_smoke(args) -> dict:
    """Fused vs vit_fast.reference.mlp under the interpreter: fp16 by the parity rule, fp64 reference."""
    notice = common.no_gpu_notice("bench_mlp")
    cases = [(2, 192, 4, "none")] if args.quick else [(2, 192, 4, "none"), (1, 384, 2, "tanh")]
    checks = []
    for batch, d, ratio, approximate in cases:
        hidden = d * ratio
        torch.manual_seed(0)
        master = [torch.randn(batch, TOKENS, d, dtype=torch.float64),
                  torch.randn(hidden, d, dtype=torch.float64) * d**-0.5, torch.randn(hidden, dtype=torch.float64) * 0.1,
                  torch.randn(d, hidden, dtype=torch.float64) * hidden**-0.5, torch.randn(d, dtype=torch.float64) * 0.1,
                  torch.randn(batch, TOKENS, d, dtype=torch.float64)]
        grad_out = torch.randn(batch, TOKENS, d, dtype=torch.float64)

        def run(fn, dtype):
            leaves = [t.to(dtype).requires_grad_() for t in master]
            y = fn(*leaves[:5], approximate=approximate, residual=leaves[5])
            return [y.detach(), *torch.autograd.grad(y, leaves, grad_out.to(dtype))]

        names = ["y", "grad_x", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias", "grad_residual"]
        out, out_pt, out_ref = run(fused.mlp, torch.float16), run(reference.mlp, torch.float16), run(reference.mlp, torch.float64)
        errors, ok = {}, True
        for name, a, b, c in zip(names, out, out_pt, out_ref):
            try:
                assert_parity(a, b, c, name=name)
            except AssertionError as e:
                ok = False
                print(f"  {e}")
            errors[name] = {"fused": (a.double() - c).abs().max().item(), "reference_fp16": (b.double() - c).abs().max().item()}
        checks.append({"batch": batch, "dim": d, "hidden": hidden, "approximate": approximate, "ok": ok,
                       "max_abs_error_vs_fp64": errors, "flops": flops(batch * TOKENS, d, hidden)})
        print(f"B={batch} D={d} hidden={hidden} GELU={approximate}: {'OK' if ok else 'MISMATCH'} (fp16, parity rule) "
              + ", ".join(f"{k} {v['fused']:.1e}/{v['reference_fp16']:.1e}" for k, v in errors.items()))
    model = {f"B={b} D={d} ratio={r}": flops(b * TOKENS, d, d * r) for b in BATCHES for d in WIDTHS for r in RATIOS}
    if not all(c["ok"] for c in checks):
        raise SystemExit("bench_mlp: the fused MLP disagrees with the reference")
    return {"notice": notice, "smoke": checks, "flop_model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape (D=192, ratio 4, B=256); one smoke case")
    parser.add_argument("--breakdown", action="store_true", help="also time each fused kernel beside cuBLAS")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where JSON and PNGs go (default {common.RESULTS_DIR})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    payload = run_gpu(args) if common.gpu_available() else run_cpu_smoke(args)
    common.write_json("bench_mlp", payload, args.out_dir)


if __name__ == "__main__":
    main()
