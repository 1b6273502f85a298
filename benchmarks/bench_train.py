"""The training step as trained: images/s, step time and peak memory per backend and step mode.

    python benchmarks/bench_train.py [--presets vit-cifar] [--batch-sizes 128 512] [--quick]

A timed step is what ``python -m vit_fast.train`` runs for each batch, built by its own code
(``vit_fast.run.setup``, ``vit_fast.step.epoch_batches``, ``run_step``): DeviceLoader draws and augments the batch
(crop, flip; mixup/cutmix with --mixup/--cutmix), then forward under bf16 autocast, the
label-smoothed loss, backward, gradient clipping, fused AdamW and the learning-rate update.
Providers: backend (reference, torch, fused) x step mode:

- eager: the model as is;
- compile: ``--compile`` (torch.compile, default mode);
- reduce-overhead: ``--compile --compile-mode reduce-overhead`` (compiled, CUDA graphs of its own);
- cuda-graphs: ``--cuda-graphs``, the whole step, data phase included, captured in one CUDA graph
  and replayed.

The dataset is synthetic, of the preset's image size and class count, and a whole number of
batches long, so every batch has the same shape (no recompilation, no dropped batch). Without a
GPU nothing is timed: the script prints the account of the same step (``python -m vit_fast.cost``:
kernels, casts, bytes, host syncs per phase and a roofline model per GPU) and says that timings
need a GPU.
"""

from __future__ import annotations

import contextlib
import io
import tempfile

import torch

from vit_fast import benchmarking as common
from vit_fast.benchmarking import device_peaks, environment, no_gpu_notice, plot_lines, time_cuda
from vit_fast import cost

BACKENDS = ("reference", "torch", "fused")
MODES = {  # name: the training CLI's arguments for it
    "eager": [],
    "compile": ["--compile"],
    "reduce-overhead": ["--compile", "--compile-mode", "reduce-overhead"],
    "cuda-graphs": ["--cuda-graphs"],
}
BASELINE = "torch/eager"  # the speedup table's denominator: what `python -m vit_fast.train` runs by default
BATCHES_PER_EPOCH = 8  # synthetic dataset length in batches: the epoch's set-up is amortised over them


def provider_names(backends=BACKENDS, modes=tuple(MODES)) -> list[str]:
    return [f"{b}/{m}" for b in backends for m in modes]


def training_run(preset: str, batch: int, backend: str, mode: str, extra: list[str], out_dir: str):
    """A TrainingRun on the GPU as the CLI builds it, on a synthetic dataset of whole batches."""
    from vit_fast import distributed as dist_mod
    from vit_fast import run as run_mod

    config = cost.training_args(preset, batch, backend, [*extra, *MODES[mode], "--device", "cuda",
                                                         "--synthetic-size", str(BATCHES_PER_EPOCH * batch),
                                                         "--out-dir", out_dir])
    with contextlib.redirect_stdout(io.StringIO()):  # setup's start line
        return run_mod.setup(config, dist_mod.World(), torch.device("cuda"))


def step_fn(run):
    """One training step as the epoch loop takes it: the next batch, then ``run_step``; under
    --cuda-graphs one ``run.graph(rows)``, which makes the batch inside the graph. A new epoch (its
    shuffle drawn and copied to the device) when one runs out, as training does."""
    from vit_fast import step as step_mod

    loader = run.train_loader
    state = {"epoch": 0}

    def begin(epoch: int):
        if run.graph is None:
            return step_mod.epoch_batches(run, epoch)
        loader.set_epoch(epoch)
        loader.begin_epoch()
        return iter(loader.batch_rows())

    state["items"] = begin(0)

    def step():
        try:
            item = next(state["items"])
        except StopIteration:
            state["epoch"] += 1
            state["items"] = begin(state["epoch"])
            item = next(state["items"])
        return run.graph(item) if run.graph is not None else step_mod.run_step(run, *item)

    return step


def time_provider(preset: str, batch: int, backend: str, mode: str, extra: list[str]) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out_dir:
        run = training_run(preset, batch, backend, mode, extra, out_dir)
        run.model.train()
        step = step_fn(run)
        for _ in range(5):  # compile, autotune, graph capture (after vit_fast.step.GRAPH_WARMUP_STEPS), allocator
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time_cuda(step, warmup=5, rep=50)
    t["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    t["images_per_s"] = batch / (t["ms"] / 1e3)
    return t  # the run goes out of scope here; the caller empties the cache


def speedup_table(rows: list[dict], providers: list[str]) -> str:
    """Images/s of every provider over BASELINE's, one line per (preset, batch)."""
    lines = [f"speedup over {BASELINE} (images/s ratio; > 1 is faster)",
             f"{'preset':<10} {'batch':>5} " + " ".join(f"{p:>20}" for p in providers)]
    for row in rows:
        base = row.get(BASELINE, {}).get("images_per_s")
        cells = [f"{row[p]['images_per_s'] / base:>20.2f}" if base and "images_per_s" in row[p] else f"{'-':>20}"
                 for p in providers]
        lines.append(f"{row['preset']:<10} {row['batch']:>5d} " + " ".join(cells))
    return "\n".join(lines)


def run_cpu(args) -> dict:
    """The account of the step as trained for every preset, batch size and backend (a model,
    computed on fake tensors), in place of timings."""
    notice = no_gpu_notice("bench_train", "the account of the step as trained (timings need a GPU)")
    accounts = {}
    for preset in args.presets:
        for batch in args.batch_sizes:
            steps = {b: cost.account_step_as_trained(preset, batch, b, args.extra) for b in args.backends}
            print(f"\n== account of the step as trained: {preset}, batch {batch} (a model, not a timing) ==")
            print(cost.format_step_table(steps))
            accounts[f"{preset}/b{batch}"] = {b: s.to_dict() for b, s in steps.items()}
    return {"timed": False, "notice": notice, "cost_account": accounts}


def run_gpu(args) -> dict:
    """Step time, images/s and peak memory of every provider, preset and batch size; the speedup
    table; a plot of images/s per preset."""
    peaks = device_peaks()
    providers = provider_names(args.backends, args.modes)
    rows = []
    for preset in args.presets:
        for batch in args.batch_sizes:
            row = {"preset": preset, "batch": batch}
            for name in providers:
                backend, mode = name.split("/")
                try:
                    row[name] = time_provider(preset, batch, backend, mode, args.extra)
                except torch.cuda.OutOfMemoryError:
                    row[name] = {"error": "out of memory"}
                torch.cuda.empty_cache()
                torch._dynamo.reset()  # compiled code of one provider never serves the next
                r = row[name]
                print(f"{preset:10s} b{batch:<4d} {name:26s} " + (
                    f"{r['ms']:8.2f} ms  {r['images_per_s']:9.0f} img/s  peak {r['peak_memory_gb']:.2f} GB"
                    if "ms" in r else r["error"]), flush=True)
            base = row.get(BASELINE, {}).get("ms")
            for name in providers:
                if "ms" in row[name] and base:
                    row[name]["speedup_vs_baseline"] = base / row[name]["ms"]
            rows.append(row)
    print("\n" + speedup_table(rows, providers))
    for preset in args.presets:
        sel = [r for r in rows if r["preset"] == preset]
        plot_lines(args.out_dir / f"bench_train_{preset}.png", [r["batch"] for r in sel],
                   {n: [r[n].get("images_per_s", float("nan")) for r in sel] for n in providers},
                   "batch size", "images/s", f"training step as trained, {preset} ({environment()['gpu']})",
                   logx=True)
    return {"timed": True, "device": peaks, "baseline": BASELINE, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "vit-cifar at batch 128 only", __file__)
    p.add_argument("--presets", nargs="+", default=["vit-cifar"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--mixup", type=float, default=0.0, help="the recipe's --mixup")
    p.add_argument("--cutmix", type=float, default=0.0, help="the recipe's --cutmix")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.batch_sizes = ["vit-cifar"], [128]
    args.extra = ["--mixup", str(args.mixup), "--cutmix", str(args.cutmix)]
    return common.run("bench_train", args, run_gpu, run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
