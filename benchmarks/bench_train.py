"""End-to-end training step: images/s, step time and peak memory per backend.

    python -m benchmarks.bench_train [--presets vit-cifar vit-tiny] [--batch-sizes 128 256 512]

Providers, side by side in one process on the same weights and data: reference, torch,
torch + torch.compile, fused, fused + torch.compile. A step is forward, backward and AdamW under
bf16 autocast (what `python -m vit_fast.train` runs on a GPU). Without a GPU, nothing is timed:
the script prints the per-step cost account (operators launched and bytes moved, a model of the
costs fusion cuts, computed on fake tensors) and says that timings need a GPU.
"""

from __future__ import annotations

import torch

from benchmarks import common
from benchmarks.common import device_peaks, environment, no_gpu_notice, plot_lines, time_cuda
from vit_fast import cost
from vit_fast.model import build_model

PROVIDERS = {  # name: (backend, compiled)
    "reference": ("reference", False),
    "torch": ("torch", False),
    "torch+compile": ("torch", True),
    "fused": ("fused", False),
    "fused+compile": ("fused", True),
}


def time_provider(preset: str, batch: int, backend: str, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(preset, backend=backend, drop_path=0.1).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    fwd = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, 32, 32, device="cuda")
    labels = torch.randint(model.cfg.num_classes, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(fwd(images).float(), labels, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile, autotune, allocator warm-up
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time_cuda(step, warmup=5, rep=50)
    t["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    t["images_per_s"] = batch / (t["ms"] / 1e3)
    return t  # the model and optimizer go out of scope here; the caller empties the cache


def run_cpu(args) -> dict:
    """The per-step cost account of every preset and batch size (a model, computed on fake tensors)."""
    notice = no_gpu_notice("bench_train", "the per-step cost account (timings need a GPU)")
    accounts = {}
    for preset in args.presets:
        for batch in args.batch_sizes:
            acc = {b: cost.account_training_step(preset, batch, b) for b in ("reference", "torch", "fused")}
            print(f"\n== cost account: {preset}, batch {batch} (fp32; a model, not a timing) ==")
            print(cost.format_table(acc, top=8))
            accounts[f"{preset}/b{batch}"] = {b: a.to_dict() for b, a in acc.items()}
    return {"timed": False, "notice": notice, "cost_account": accounts}


def run_gpu(args) -> dict:
    """Step time, images/s and peak memory of every provider, preset and batch size, plus a plot per preset."""
    peaks = device_peaks()
    rows = []
    for preset in args.presets:
        for batch in args.batch_sizes:
            row = {"preset": preset, "batch": batch}
            for name in args.providers:
                backend, compiled = PROVIDERS[name]
                try:
                    row[name] = time_provider(preset, batch, backend, compiled)
                except torch.cuda.OutOfMemoryError:
                    row[name] = {"error": "out of memory"}
                torch.cuda.empty_cache()
                r = row[name]
                print(f"{preset:10s} b{batch:<4d} {name:14s} " + (
                    f"{r['ms']:8.2f} ms  {r['images_per_s']:9.0f} img/s  peak {r['peak_memory_gb']:.2f} GB" if "ms" in r else r["error"]), flush=True)
            base = row.get("torch", {}).get("ms")
            for name in args.providers:
                if "ms" in row[name] and base:
                    row[name]["speedup_vs_torch"] = base / row[name]["ms"]
            rows.append(row)
    for preset in args.presets:
        sel = [r for r in rows if r["preset"] == preset]
        plot_lines(args.out_dir / f"bench_train_{preset}.png", [r["batch"] for r in sel],
                   {n: [r[n].get("images_per_s", float("nan")) for r in sel] for n in args.providers},
                   "batch size", "images/s", f"training step, {preset} ({environment()['gpu']})", logx=True)
    return {"timed": True, "device": peaks, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "vit-cifar at batch 128 only")
    p.add_argument("--presets", nargs="+", default=["vit-cifar", "vit-tiny", "vit-small"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.batch_sizes = ["vit-cifar"], [128]
    return common.run("bench_train", args, run_gpu, run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
