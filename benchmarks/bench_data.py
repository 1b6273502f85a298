"""Throughput of the device-resident input pipeline (crop, flip, normalise, optional mixup).

    python benchmarks/bench_data.py [--batch-size 128] [--images 50000] [--mixup 0.8]

The pipeline runs wherever the data lives: on a GPU this is the number that must stay far above
the model's images/s; on a CPU it is an honest CPU measurement of the same code (wall clock,
median of several epochs), useful to compare changes to the pipeline, not to predict a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from vit_fast import data  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50_000, help="synthetic images of CIFAR's shape")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--quick", action="store_true", help="5000 images, 1 timed epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs = 5000, 1
    device = torch.device(args.device)
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
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (wall clock)"
    print(f"input pipeline on {where}: {rate:,.0f} images/s "
          f"(batch {args.batch_size}, crop+flip+normalise{', mixup' if args.mixup else ''}{', cutmix' if args.cutmix else ''})")
    result = {"device": where, "images_per_s": rate, "epoch_times_s": times, "args": vars(args)}
    write_json("bench_data", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
