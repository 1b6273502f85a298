"""Benchmark of the fused LayerNorm (+ residual add), vit_fast.fused.layernorm.

    python benchmarks/bench_layernorm.py [--quick] [--dtype bf16] [--out-dir DIR]

Providers, side by side in one process, on identical inputs, all vit_fast.ops.layer_norm /
add_layer_norm with a backend:
  reference      backend "reference": the readable spec, eager
  torch          backend "torch": F.layer_norm; for the residual variant x + residual, then F.layer_norm
  torch.compile  the torch provider under torch.compile
  fused          backend "fused": the Triton kernels of vit_fast.fused
Variants: plain LayerNorm, and the pre-LN block's residual add + LayerNorm (outputs y and s).
Passes: forward, and forward + backward (gradients of every input, with incoming gradients for y
and, in the residual variant, for s).

Byte model: the compulsory HBM traffic of the activations, M rows of width N, e bytes each,
plus the fp32 mean and rstd (8 bytes per row each way); weight, bias and their partial sums are
O(N) and left out. GB/s = modelled bytes / time, % of HBM = GB/s / the device's peak:
  plain     forward read x, write y                          2 MNe + 8M
            backward read x, dy, write dx                    3 MNe + 8M
  residual  forward read x, residual, write y, s             4 MNe + 8M
            backward read s, dy, ds, write dx (= dresidual)  4 MNe + 8M
Every provider is credited with the same bytes, so GB/s compares time; an unfused provider moves
more (add then LayerNorm: 5 MNe forward instead of 4), which is the point of the fusion.

Goals for GPUs, to be measured (not claimed here): forward at >= 85% of HBM bandwidth at width
768; forward + backward faster than F.layer_norm at widths 192 and 384.

Without a GPU nothing is timed: the script says so and checks every provider against the
reference on CPU (the Triton kernels under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vit_fast import benchmarking as common
from vit_fast.benchmarking import PROVIDERS, device_peaks, no_gpu_notice, plot_lines, time_cuda
from vit_fast import ops
from vit_fast.testing import assert_parity

EPS = 1e-6
WIDTHS = (192, 384, 768, 1024)
ROWS = (128 * 65, 512 * 65)  # CIFAR-100 ViT: batch 128 / 512 of 64 patches + class token
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def layer_norm(backend: str):
    return lambda x, w, b: (ops.layer_norm(x, w, b, EPS, backend),)


def add_layer_norm(backend: str):
    return lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS, backend)


def make_providers() -> dict:
    """provider -> (plain fn, residual fn); each returns a tuple of outputs. Once per shape."""
    plain, residual = common.providers(layer_norm), common.providers(add_layer_norm)
    return {name: (plain[name], residual[name]) for name in PROVIDERS}


def make_inputs(rows: int, width: int, dtype, device, residual: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    x = rand(rows, width)
    inputs = [x, rand(rows, width)] if residual else [x]
    inputs += [rand(width, scale=0.5, shift=1.0), rand(width, scale=0.5)]
    grads = [rand(rows, width) for _ in range(2 if residual else 1)]
    return [t.requires_grad_() for t in inputs], grads


def modelled_bytes(rows: int, width: int, itemsize: int, residual: bool, backward: bool) -> int:
    """The byte model of the module docstring."""
    fwd = (4 if residual else 2) * rows * width * itemsize + 8 * rows
    bwd = (4 if residual else 3) * rows * width * itemsize + 8 * rows
    return fwd + (bwd if backward else 0)


def run_pass(fn, inputs, grads, backward: bool):
    outs = fn(*inputs)
    if not backward:
        return outs, None
    return outs, torch.autograd.grad(outs, inputs, grads)


def check_provider(name, fn, inputs, grads, ref_fn, dtype):
    """Forward outputs and input gradients of ``fn`` against the reference: fp32 directly, 16-bit
    dtypes by the parity rule (reference in the same dtype vs the reference in fp32)."""
    outs, dins = run_pass(fn, inputs, grads, backward=True)
    outs_pt, dins_pt = run_pass(ref_fn, inputs, grads, backward=True)
    results = list(outs) + list(dins)
    expected = list(outs_pt) + list(dins_pt)
    if dtype == torch.float32:
        for got, want in zip(results, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * max(1.0, want.abs().max().item()))
    else:
        inputs32 = [t.detach().float().requires_grad_() for t in inputs]
        outs_ref, dins_ref = run_pass(ref_fn, inputs32, [g.float() for g in grads], backward=True)
        for i, (got, pt, ref) in enumerate(zip(results, expected, list(outs_ref) + list(dins_ref))):
            assert_parity(got, pt, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), name=f"{name}[{i}]")
    return max((got.double() - want.double()).abs().max().item() for got, want in zip(results, expected))


def checked(name, fn, inputs, grads, ref_fn, dtype) -> tuple[float | None, str | None]:
    """(max error, None), or (None, message) when a baseline misses the parity rule. A baseline's
    deviation is reported, not fatal (torch's CPU bf16 LayerNorm accumulates dweight coarsely);
    the fused provider's is an error."""
    try:
        return check_provider(name, fn, inputs, grads, ref_fn, dtype), None
    except AssertionError as e:
        if name == "fused":
            raise
        print(f"WARNING: {name} misses the reference's parity rule: {e}")
        return None, str(e)


def run_cpu(args) -> dict:
    """CPU: every provider, forward and backward, against the reference; nothing timed."""
    no_gpu_notice("bench_layernorm")
    widths = (192, 768) if args.quick else WIDTHS
    rows, dtype = 65, DTYPES[args.dtype]
    providers = make_providers()
    records = []
    print(f"\ncorrectness smoke, {rows} rows, {args.dtype}: max |provider - reference| over outputs and gradients")
    print(f"{'variant':>9} {'width':>6} " + " ".join(f"{p:>14}" for p in PROVIDERS) + "   modelled MB fwd / fwd+bwd at 512*65 rows")
    for residual in (False, True):
        variant = "residual" if residual else "plain"
        ref_fn = providers["reference"][residual]
        for width in widths:
            inputs, grads = make_inputs(rows, width, dtype, "cpu", residual)
            checks = {p: checked(p, providers[p][residual], inputs, grads, ref_fn, dtype) for p in PROVIDERS}
            errors = {p: err for p, (err, _) in checks.items()}
            itemsize = torch.empty((), dtype=dtype).element_size()
            mb = [modelled_bytes(ROWS[-1], width, itemsize, residual, bwd) / 1e6 for bwd in (False, True)]
            records.append(dict(variant=variant, width=width, rows=rows, dtype=args.dtype, max_abs_error=errors,
                                parity_failures={p: msg for p, (_, msg) in checks.items() if msg},
                                modelled_mb_fwd=mb[0], modelled_mb_fwd_bwd=mb[1]))
            print(f"{variant:>9} {width:>6} " + " ".join(
                f"{errors[p]:>14.2e}" if errors[p] is not None else f"{'PARITY FAIL':>14}" for p in PROVIDERS)
                  + f"   {mb[0]:8.1f} / {mb[1]:8.1f}")
    print("fused matches the reference (fp32 tight, 16-bit by the parity rule); "
          "baselines' failures, if any, are listed above")
    return {"mode": "cpu-smoke", "records": records}


def run_gpu(args) -> dict:
    """GPU: time every provider, pass, variant, width and row count; GB/s from the byte model."""
    peaks = device_peaks()
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows_list = ROWS[:1] if args.quick else ROWS
    records = []
    print(f"{peaks['gpu']}, {args.dtype}, peak HBM {peaks['peak_gbps']} GB/s")
    for residual in (False, True):
        variant = "residual" if residual else "plain"
        for rows in rows_list:
            for width in WIDTHS:
                inputs, grads = make_inputs(rows, width, dtype, "cuda", residual)
                providers = make_providers()
                # Correctness first, on the very inputs that are timed.
                failures = {p: checked(p, providers[p][residual], inputs, grads, providers["reference"][residual], dtype)[1]
                            for p in PROVIDERS}
                for backward in (False, True):
                    nbytes = modelled_bytes(rows, width, itemsize, residual, backward)
                    times = {}
                    for p in PROVIDERS:
                        fn = providers[p][residual]
                        if backward:
                            t = time_cuda(lambda: run_pass(fn, inputs, grads, True))
                        else:
                            with torch.no_grad():
                                t = time_cuda(lambda: fn(*inputs))
                        times[p] = t
                        gbps = nbytes / (t["ms"] * 1e-3) / 1e9
                        records.append({
                            "variant": variant, "pass": "fwd+bwd" if backward else "fwd", "rows": rows,
                            "width": width, "dtype": args.dtype, "provider": p, **t, "modelled_bytes": nbytes,
                            "gbps": gbps, "pct_hbm": 100 * gbps / peaks["peak_gbps"] if peaks["peak_gbps"] else None,
                            "matches_reference": failures.get(p) is None,
                        })
                    fused_ms = times["fused"]["ms"]
                    line = " ".join(f"{p}={times[p]['ms'] * 1e3:7.1f}us" for p in PROVIDERS)
                    speedups = "fused speedup " + " ".join(
                        f"x{times[p]['ms'] / fused_ms:.2f} vs {p}" for p in PROVIDERS if p != "fused")
                    pct = records[-1]["pct_hbm"]
                    print(f"{variant:>8} {'fwd+bwd' if backward else 'fwd':>7} rows={rows:>6} N={width:>5}: {line} | "
                          f"fused {records[-1]['gbps']:.0f} GB/s" + (f" ({pct:.0f}% HBM)" if pct else "") + f" | {speedups}")
    result = {"mode": "gpu", "peaks": peaks, "records": records}
    plot(result, args.out_dir)
    return result


def plot(result: dict, out_dir: Path) -> None:
    rows = max(r["rows"] for r in result["records"])
    for variant in ("plain", "residual"):
        for pass_ in ("fwd", "fwd+bwd"):
            sel = [r for r in result["records"] if r["variant"] == variant and r["pass"] == pass_ and r["rows"] == rows]
            series = {p: [r["gbps"] for r in sel if r["provider"] == p] for p in PROVIDERS}
            plot_lines(out_dir / f"bench_layernorm_{variant}_{pass_.replace('+', '_')}.png", list(WIDTHS), series,
                       "width N", "GB/s (byte model)", f"LayerNorm {variant} {pass_}, {rows} rows, {sel[0]['dtype']}")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "fewer shapes: 128*65 rows on a GPU, widths 192 and 768 on CPU", __file__)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bf16 on a GPU (training's dtype), fp32 for the CPU smoke (tightest check)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if common.gpu_available() else "fp32")
    return common.run("bench_layernorm", args, run_gpu, run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
