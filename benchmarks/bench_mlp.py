"""Benchmark of the fused transformer MLP (vit_fast.fused.mlp) against eager PyTorch and torch.compile.

Providers, side by side in one process, all vit_fast.ops.mlp with a backend, computing
residual + fc2(GELU(fc1(x))) with the same parameters:
  fused          backend "fused": Triton fc1+bias+GELU, fc2+bias+residual; backward with the GELU
                 derivative fused into dY W2 (pre-activation recomputed) and one Triton launch for
                 the weight, bias and input gradients
  torch          backend "torch": F.linear -> F.gelu -> F.linear, + residual, in eager mode (what
                 a PyTorch user writes)
  torch.compile  the torch provider under torch.compile
  reference      backend "reference": the readable spec, eager
Passes: forward (no grad), and forward + backward (gradients of x, the residual and all four
parameters: the training step).

FLOP model: forward 2*M*(D*Hd)*2 (two GEMMs of M x D x Hd), backward twice that; M = B*65
tokens (CIFAR, 4x4 patches + class token), D the width, Hd = ratio*D. TFLOP/s and percent of the
device's dense 16-bit peak are read from it (bias, GELU and residual FLOPs are not counted).

The breakdown (--breakdown) lists the device time of every kernel one forward + backward
launches, fused beside torch (torch.profiler), to confirm or overturn two design choices made
without a GPU: recomputing the pre-activation in the GELU backward kernel (kernels/mlp.py; its
alternative costs the write and read of the (M, Hd) pre-activation, timed as read_write_hidden)
and computing the weight/bias/input gradients in one Triton launch (linear_bwd_kernel, each weight
gradient tile reducing one slice of the rows, then weight_grad_reduce_kernel summing the slices)
rather than cuBLAS (its kernels beside torch's).

The goal (measured here, never claimed before): forward+backward at least 1.2x faster than
the torch provider and not slower than torch.compile at the CIFAR shapes.

Without a GPU nothing is timed; the script checks the fused MLP against the reference under
TRITON_INTERPRET=1 (forward and every gradient, at a CIFAR width) and reports the model.

    python benchmarks/bench_mlp.py [--quick] [--breakdown] [--out-dir DIR] [--dtype bf16|fp16]
"""

from __future__ import annotations

import torch

from vit_fast import benchmarking as common
from vit_fast.benchmarking import PASSES
from vit_fast import ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = 65  # 8x8 patches of a 32x32 image + the class token
BATCHES, QUICK_BATCHES = (128, 256, 512), (256,)
WIDTHS, QUICK_WIDTHS = (192, 384), (192,)
RATIOS, QUICK_RATIOS = (2, 4), (4,)
GRADIENTS = ["y", "grad_x", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias", "grad_residual"]


def mlp(backend: str, approximate: str = "none"):
    """The provider's call: inputs in make_inputs' order (x, fc1 weight and bias, fc2 weight and bias, residual)."""
    return lambda x, w1, b1, w2, b2, residual: ops.mlp(x, w1, b1, w2, b2, approximate, backend, residual=residual)


def make_inputs(batch: int, d: int, hidden: int) -> list[torch.Tensor]:
    """fp64 x (B, 65, D), fc1 (Hd, D) + (Hd,), fc2 (D, Hd) + (D,), residual (B, 65, D); weights at
    nn.Linear's scale so activations stay O(1)."""
    f64 = dict(dtype=torch.float64)
    return [torch.randn(batch, TOKENS, d, **f64),
            torch.randn(hidden, d, **f64) * d**-0.5, torch.randn(hidden, **f64) * 0.1,
            torch.randn(d, hidden, **f64) * hidden**-0.5, torch.randn(d, **f64) * 0.1,
            torch.randn(batch, TOKENS, d, **f64)]


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
                fns = common.providers(mlp)
                torch.manual_seed(0)
                inputs = [t.to(device="cuda", dtype=dtype).requires_grad_() for t in make_inputs(batch, d, hidden)]
                grad_out = torch.randn_like(inputs[0])
                model = flops(m, d, hidden)
                row = {"dim": d, "ratio": ratio, "batch": batch, "tokens": m, "flops": model, "providers": {}}
                for name, fn in fns.items():
                    times = common.time_passes(fn, inputs, inputs, grad_out)
                    row["providers"][name] = common.with_rates(times, model, "tflops", 1e12, peaks["peak_tflops"], "pct_peak")
                common.add_speedups(row)
                results.append(row)
                p, s = row["providers"], row["speedup_forward_backward"]
                print(
                    f"D={d:<4} ratio={ratio} B={batch:<4} fwd+bwd: fused {p['fused']['forward_backward']['ms']:.3f} ms "
                    f"({p['fused']['forward_backward']['tflops']:.0f} TFLOP/s), x{s['torch']:.2f} vs torch "
                    f"(goal >= 1.2), x{s['torch.compile']:.2f} vs torch.compile (goal >= 1.0) | fwd: "
                    f"x{row['speedup_forward']['torch']:.2f} vs torch"
                )
                if args.breakdown:
                    breakdowns.append(breakdown(fns, inputs, grad_out, d, hidden))
    plot(args, results)
    return {"device": peaks, "dtype": args.dtype, "results": results, "breakdown": breakdowns,
            "goal": "forward_backward speedup >= 1.2 vs torch and >= 1.0 vs torch.compile"}


def breakdown(fns: dict, inputs: list[torch.Tensor], grad_out, d: int, hidden: int) -> dict:
    """Every kernel of one forward + backward, fused beside torch, in device ms per step."""
    kernels = {name: common.kernel_times(lambda fn=fns[name]: torch.autograd.grad(fn(*inputs), inputs, grad_out))
               for name in ("fused", "torch")}
    x = inputs[0]
    hidden_act = torch.empty(x.shape[0] * x.shape[1], hidden, device=x.device, dtype=x.dtype)  # (M, Hd)
    read_write_hidden = common.time_cuda(lambda: hidden_act.clone())  # moves 2 * M*Hd elements
    for name, times in kernels.items():
        print(f"  breakdown {name} (ms per step): " + ", ".join(f"{k[:60]} {v:.3f}" for k, v in times.items()))
    print(f"  read_write_hidden {read_write_hidden['ms']:.3f} ms")
    return {"dim": d, "hidden": hidden, "tokens": hidden_act.shape[0], "kernel_ms": kernels,
            "read_write_hidden": read_write_hidden}


def plot(args, results: list[dict]) -> None:
    for d in sorted({r["dim"] for r in results}):
        for ratio in sorted({r["ratio"] for r in results}):
            rows = [r for r in results if r["dim"] == d and r["ratio"] == ratio]
            if len(rows) < 2:
                continue
            for pass_name in PASSES:
                series = {name: [r["providers"][name][pass_name]["tflops"] for r in rows] for name in rows[0]["providers"]}
                common.plot_lines(args.out_dir / f"bench_mlp_d{d}_r{ratio}_{pass_name}.png", [r["tokens"] for r in rows],
                                  series, "tokens M = batch x 65", "TFLOP/s (FLOP model)",
                                  f"MLP {pass_name}, D={d}, hidden={d * ratio}, {args.dtype}", logx=True)


def run_cpu(args) -> dict:
    """Fused vs the reference under the interpreter: fp16 by the parity rule, fp64 reference."""
    notice = common.no_gpu_notice("bench_mlp")
    cases = [(2, 192, 4, "none")] if args.quick else [(2, 192, 4, "none"), (1, 384, 2, "tanh")]
    checks, failures = [], []
    for batch, d, ratio, approximate in cases:
        hidden = d * ratio
        torch.manual_seed(0)
        master = make_inputs(batch, d, hidden)
        grad_out = [torch.randn(batch, TOKENS, d, dtype=torch.float64)]
        fused, same, wide = (common.outputs_and_grads(mlp(backend, approximate), master, grad_out, dtype)
                             for backend, dtype in (("fused", torch.float16), ("reference", torch.float16),
                                                    ("reference", torch.float64)))
        errors, failed = common.parity_errors(GRADIENTS, fused, same, wide)
        failures += failed
        checks.append({"batch": batch, "dim": d, "hidden": hidden, "approximate": approximate, "ok": not failed,
                       "max_abs_error_vs_fp64": errors, "flops": flops(batch * TOKENS, d, hidden)})
        print(f"B={batch} D={d} hidden={hidden} GELU={approximate}: {'MISMATCH' if failed else 'OK'} (fp16, parity rule) "
              + ", ".join(f"{k} {v['fused']:.1e}/{v['reference_same_dtype']:.1e}" for k, v in errors.items()))
    model = {f"B={b} D={d} ratio={r}": flops(b * TOKENS, d, d * r) for b in BATCHES for d in WIDTHS for r in RATIOS}
    return {"notice": notice, "smoke": checks, "failures": failures, "flop_model": model}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, "one shape (D=192, ratio 4, B=256); one smoke case", __file__)
    parser.add_argument("--breakdown", action="store_true", help="also list each kernel's time, fused beside torch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    return common.run("bench_mlp", parser.parse_args(argv), run_gpu, run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
