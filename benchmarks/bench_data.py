"""Throughput of the device-resident input pipeline (crop, flip, normalise, optional mixup).

    python -m benchmarks.bench_data [--batch-size 128] [--images 50000] [--mixup 0.8] [--device cpu]

The pipeline runs wherever the data lives: on a GPU (run_gpu) this is the number that must stay
far above the model's images/s; on a CPU (run_cpu) it is an honest CPU measurement of the same
code (wall clock, median of several epochs), useful to compare changes to the pipeline, not to
predict a GPU.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import common
from vit_fast import data


def measure(args, device: torch.device) -> dict:
    """Images per second of the training-mode loader on ``device``: one warm-up epoch, then the
    median of ``args.epochs`` timed epochs."""
    ds = data.synthetic(args.images, 100).to(device)
    mean, std = data.channel_stats(ds.images)
    aug = data.Augment(padding=4, flip=True, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix)
    loader = data.DeviceLoader(ds, args.batch_size, mean, std, train=True, augment=aug)

    def one_epoch(e: int) -> float:
        loader.set_epoch(e)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, _ in loader:
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one_epoch(0)  # warm-up (allocator, first-call overheads)
    times = [one_epoch(e + 1) for e in range(args.epochs)]
    rate = args.images / statistics.median(times)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (wall clock)"
    print(f"input pipeline on {where}: {rate:,.0f} images/s "
          f"(batch {args.batch_size}, crop+flip+normalise{', mixup' if args.mixup else ''}{', cutmix' if args.cutmix else ''})")
    return {"device": where, "images_per_s": rate, "epoch_times_s": times}


def run_gpu(args) -> dict:
    return measure(args, torch.device(args.device))


def run_cpu(args) -> dict:
    return measure(args, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "5000 images, 1 timed epoch")
    p.add_argument("--images", type=int, default=50_000, help="synthetic images of CIFAR's shape")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the data lives (default: cuda when present); cpu measures the CPU path on any machine")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs = 5000, 1
    return common.run("bench_data", args, run_gpu, run_cpu, on_gpu=torch.device(args.device).type == "cuda")


if __name__ == "__main__":
    raise SystemExit(main())
