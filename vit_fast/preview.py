"""A look at what the model sees: ``python -m vit_fast.data --preview grid.png`` (the command's
module is ``vit_fast.data``; the preview is here). A grid of the first training batch of an
epoch, as the training loader builds it under a recipe, each image captioned with its label (a
mixed image with its two classes and their shares).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from . import recipes
from .datasets import DATASETS, DatasetIntegrityError, ImageDataset, channel_stats, load_split
from .loader import DeviceLoader


def _caption(target: Tensor, classes: list[str]) -> str:
    """A label (), or the two largest shares of a mixed target (K,)."""
    if target.ndim == 0:
        return classes[int(target)]
    shares, which = target.topk(min(2, target.numel()))
    if float(shares[0]) == 1.0:  # an image this batch did not mix
        return classes[int(which[0])]
    parts = [f"{classes[int(k)]} {float(v):.2f}" for v, k in zip(shares, which) if float(v) > 0]
    return "\n".join(parts)


def preview(dataset: ImageDataset, recipe, path: str | Path, count: int = 32, seed: int = 0, epoch: int = 0,
            columns: int = 8) -> Path:
    """Write a grid of the first ``count`` training images of ``epoch`` as the model sees them under
    ``recipe`` (a vit_fast.recipes preset): the training loader's own batch, un-normalised for
    display, each captioned with its label (a mixed image with its two classes and their shares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    mean, std = channel_stats(dataset.images)
    loader = DeviceLoader(dataset, count, mean, std, train=True, augment=recipe.augmentation(), seed=seed)
    loader.set_epoch(epoch)
    x, targets = next(iter(loader))
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    images = (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C) in [0, 1]
    targets = targets.cpu()
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.0 * rows), squeeze=False,
                             constrained_layout=True)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(_caption(targets[i], dataset.classes), fontsize=7)
    fig.suptitle(f"recipe {recipe.name}: training batch of epoch {epoch} (seed {seed})", fontsize=9)
    return save_figure(fig, path)


MAX_PREVIEW_IMAGES = 256  # a preview grid of 32 rows of 8: 12.8 x 64 inches, written in seconds


def preview_path(path: str | Path) -> Path:
    """The file ``--preview`` writes: ``path``, with ``.png`` added when it has no suffix (as
    matplotlib would add it); an image format matplotlib does not write is a UsageError."""
    from matplotlib.backend_bases import FigureCanvasBase

    from .cli import UsageError
    from .paths import check_output_file

    path = Path(path)
    if not path.suffix and not path.is_dir():
        path = path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if not path.is_dir() and path.suffix[1:].lower() not in formats:
        raise UsageError(f"--preview {path}: {path.suffix!r} is not an image format matplotlib writes; use .png "
                         f"(or one of {', '.join(sorted(formats))})")
    return check_output_file(path, "--preview")


def main(argv: list[str] | None = None) -> Path:
    """``python -m vit_fast.data --preview grid.png``: a look at the augmented training data."""
    import argparse

    from .cli import UsageError, errors_handled

    p = argparse.ArgumentParser(prog="python -m vit_fast.data", description=main.__doc__)
    p.add_argument("--preview", required=True, metavar="PNG",
                   help="write the grid of augmented images here (.png added to a name without a suffix)")
    p.add_argument("--dataset", default="cifar100", choices=DATASETS)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    p.add_argument("--count", type=int, default=32, help=f"images in the grid, at most {MAX_PREVIEW_IMAGES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0, help="the epoch whose first batch is shown (0-based)")
    recipes.add_recipe_argument(p)
    recipes.add_augment_arguments(p.add_argument_group("augmentation (overrides the recipe)"))
    args = p.parse_args(argv)
    # DatasetNotFoundError is a FileNotFoundError, ImageReadError a DatasetIntegrityError.
    with errors_handled(FileNotFoundError, DatasetIntegrityError):
        if args.count <= 0 or args.epoch < 0:
            raise UsageError(f"--count must be positive and --epoch >= 0, got {args.count} and {args.epoch}")
        if args.count > MAX_PREVIEW_IMAGES:
            raise UsageError(f"--count {args.count}: a preview grid holds at most {MAX_PREVIEW_IMAGES} images "
                             "(data.MAX_PREVIEW_IMAGES)")
        try:
            recipe = recipes.resolve(args)
            recipes.check(recipe)
        except ValueError as err:
            raise UsageError(str(err)) from None
        image_size = 32  # the preview loads every dataset at load_split's default size
        if recipe.crop_padding >= image_size:
            raise UsageError(f"--crop-padding {recipe.crop_padding} is at least the image size ({image_size} pixels): "
                             "many random crops would be all padding; use a padding below it (lee2021: 4)")
        out = preview_path(args.preview)  # before the data is loaded and the grid drawn
        train_set = load_split(args.dataset, args.data_dir, True, download=not args.no_download, seed=args.seed)
        path = preview(train_set, recipe, out, args.count, args.seed, args.epoch)
    shown = min(args.count, len(train_set))
    print(f"wrote {path}: {shown} training images of {args.dataset} under recipe {recipe.name}")
    return path


if __name__ == "__main__":
    main()
