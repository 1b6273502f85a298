"""Throughput of the device-resident input pipeline (crop, flip, normalise, optional mixup).

    python benchmarks/bench_data.py [--batch-size 128] [--images 50000] [--mixup 0.8] [--device cpu]
                                    [--host-images]
    python benchmarks/bench_data.py --recipe [--workers 2] [--repeats 3]

``--recipe`` compares the full Lee et al. (2021) / DeiT recipe (crop + flip, AutoAugment CIFAR-10
policy, random erasing, mixup / cutmix, label smoothing) done batched by vit_fast.augment with the
same recipe done by torchvision's per-image transforms in a DataLoader with worker processes (as
many workers as cores), side by side in one process, alternating, and prints both rates and the ratio.
Measured here (2 cores shared with other jobs, 2048 images, batch 256, five runs): batched on one
thread 1,100-3,800 images/s against the DataLoader's 550-1,900 as the load varied, ratio 1.9-2.4x
in every run. With --threads 2 the batched side fell to 120-1,000 images/s (0.17-0.39x): on the
oversubscribed CPU, OpenMP's two threads wait on each other.

The pipeline runs wherever the data lives: on a GPU (run_gpu) this is the number that must stay
far above the model's images/s; on a CPU (run_cpu) it is an honest CPU measurement of the same
code (wall clock, median of several epochs), useful to compare changes to the pipeline, not to
predict a GPU. ``--host-images`` keeps the images in host memory and stages each batch to the
device (``--data-device cpu``, for datasets larger than the GPU): on a GPU the rate then includes
the host's gather and the copy over PCIe.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from vit_fast import benchmarking as common
from vit_fast import datasets
from vit_fast.augment.config import AugmentConfig
from vit_fast.loader import DeviceLoader


def measure(args, device: torch.device) -> dict:
    """Images per second of the training-mode loader on ``device``: one warm-up epoch, then the
    median of ``args.epochs`` timed epochs."""
    ds = datasets.synthetic(args.images, 100)
    mean, std = datasets.channel_stats(ds.images)
    aug = AugmentConfig(crop_padding=4, flip=True, mixup=args.mixup, cutmix=args.cutmix, mix_prob=1.0)
    loader = DeviceLoader(ds, args.batch_size, mean, std, train=True, augment=aug, device=device,
                          host_images=args.host_images)

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
    staged = ", images staged from host memory" if args.host_images else ""
    print(f"input pipeline on {where}: {rate:,.0f} images/s "
          f"(batch {args.batch_size}, crop+flip+normalise{', mixup' if args.mixup else ''}{', cutmix' if args.cutmix else ''}"
          f"{staged})")
    return {"device": where, "images_per_s": rate, "epoch_times_s": times}


def run_gpu(args) -> dict:
    return measure(args, torch.device(args.device))


def run_cpu(args) -> dict:
    if args.recipe:
        return compare_recipe(args)
    return measure(args, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "5000 images, 1 timed epoch", __file__)
    p.add_argument("--images", type=int, default=50_000, help="synthetic images of CIFAR's shape")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the data lives (default: cuda when present); cpu measures the CPU path on any machine")
    p.add_argument("--host-images", action="store_true",
                   help="keep the images in host memory and stage each batch to the device (--data-device cpu)")
    p.add_argument("--recipe", action="store_true", help="batched recipe vs torchvision DataLoader, on the CPU (see above)")
    p.add_argument("--workers", type=int, default=None, help="--recipe: DataLoader workers (default: cores)")
    p.add_argument("--repeats", type=int, default=3, help="--recipe: timed rounds of each side")
    p.add_argument("--threads", type=int, default=1,
                   help="--recipe: torch threads of the batched side (default 1, so it uses no more cores than "
                        "the workers; on the shared, oversubscribed 2-core CPU here 2 OpenMP threads ran ~10x slower)")
    args = p.parse_args(argv)
    if args.recipe:  # a CPU comparison on any machine
        args.device = "cpu"
    if args.quick:
        args.images, args.epochs = 5000, 1
    return common.run("bench_data", args, run_gpu, run_cpu, on_gpu=torch.device(args.device).type == "cuda")


class _PerImageRecipe(torch.utils.data.Dataset):
    """The recipe's per-image part with torchvision transforms, as a DataLoader worker runs it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: list[float], std: list[float]) -> None:
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomCrop(images.shape[-1], padding=4),
            v2.RandomHorizontalFlip(),
            v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.RandomErasing(p=0.25, value="random"),  # per-pixel normal values, as DeiT's 'pixel' mode
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def compare_recipe(args) -> dict:
    """Images/s of the whole recipe, batched (vit_fast.augment) against per image (torchvision in a
    DataLoader), on the CPU with the same cores; each side timed ``args.repeats`` times, alternating,
    after a warm-up pass, and the medians compared."""
    from torchvision.transforms import v2

    from vit_fast.augment import pipeline

    cores = len(os.sched_getaffinity(0))
    workers = cores if args.workers is None else args.workers
    n = min(args.images, 4096)
    ds = datasets.synthetic(n, 100)
    mean, std = datasets.channel_stats(ds.images)
    # DeiT's augmentation (its label smoothing below), as _PerImageRecipe's transforms.
    config = AugmentConfig(crop_padding=4, flip=True, policy="autoaugment", erase=0.25, erase_max_area=1 / 3,
                           erase_mode="pixel", mixup=0.8, cutmix=1.0, mix_prob=1.0, mix_switch_prob=0.5)
    policy = pipeline.policy_of(config)
    mean_t, std_t, classes = torch.tensor(mean), torch.tensor(std), torch.arange(100)
    threads = args.threads

    def batched() -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)  # only here: the DataLoader side's main process keeps its own
        try:
            g = torch.Generator().manual_seed(0)
            order = torch.randperm(n, generator=g)
            for sel in order.split(args.batch_size):
                draws = pipeline.draw_batch(config, policy, (len(sel), *ds.images.shape[1:]), g, "cpu")
                pipeline.build_batch(ds.images, sel, ds.labels[sel], draws, config, policy, mean_t, std_t, classes,
                                     smoothing=0.1)
        finally:
            torch.set_num_threads(before)

    # Batch-level mixup / cutmix the torchvision way, in the main process after collating.
    mixing = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=100), v2.CutMix(alpha=1.0, num_classes=100)])
    loader = torch.utils.data.DataLoader(
        _PerImageRecipe(ds.images, ds.labels, mean, std), batch_size=args.batch_size, shuffle=True,
        num_workers=workers, persistent_workers=workers > 0, drop_last=False,
    )  # fmt: skip

    def per_image() -> None:
        for x, y in loader:
            mixing(x, y)

    def rate(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)

    batched(), per_image()  # warm-up: worker start, allocator, cached tables
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(rate(batched))
        theirs.append(rate(per_image))
    mine, ref = statistics.median(ours), statistics.median(theirs)
    print(f"recipe (crop+flip, AutoAugment CIFAR-10, erasing 0.25, mixup 0.8 / cutmix 1.0) on {cores} CPU cores, "
          f"{n} images, batch {args.batch_size}, median of {args.repeats}:")
    print(f"  batched vit_fast.augment ({threads} threads):          {mine:>9,.0f} images/s  "
          f"{[round(r) for r in ours]}")
    print(f"  torchvision per image, DataLoader({workers} workers): {ref:>9,.0f} images/s  "
          f"{[round(r) for r in theirs]}")
    print(f"  ratio batched / per-image: {mine / ref:.2f}x")
    result = {
        "device": "CPU (wall clock)", "cores": cores, "workers": workers, "threads": threads, "images": n,
        "batched_images_per_s": ours, "per_image_images_per_s": theirs, "ratio": mine / ref, "args": vars(args),
    }  # fmt: skip
    return result


if __name__ == "__main__":
    raise SystemExit(main())
