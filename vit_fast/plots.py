"""Training curves from a metrics log (the ``metrics.jsonl`` that ``vit_fast.train`` writes).

    python -m vit_fast.plots runs/vit/metrics.jsonl            # writes runs/vit/curves.png
    python -m vit_fast.plots runs/vit/metrics.jsonl -o out.png

One figure, five panels against epoch: loss (train and val), top-1, top-5, learning rate and
training throughput (images/s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .paths import check_output_file

# (panel title, [(metrics key, label)], y-axis label, log scale)
PANELS = (
    ("loss", [("train_loss", "train"), ("val_loss", "val")], "cross-entropy", False),
    ("top-1 accuracy", [("top1", "val top-1")], "%", False),
    ("top-5 accuracy", [("top5", "val top-5")], "%", False),
    ("learning rate", [("lr", "lr at epoch end")], "lr", True),
    ("throughput", [("images_per_s", "train")], "images/s", False),
)
REQUIRED = ("epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_s")


def read_metrics(path: str | Path) -> list[dict]:
    """The epoch records of a metrics log, one JSON object per line, with errors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics log {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not a JSON object ({err})") from None
        missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path}:{n} lacks {missing}; expected a vit_fast.train metrics line with {list(REQUIRED)}")
        records.append(record)
    if not records:
        raise ValueError(f"metrics log {path} has no epochs to plot")
    return records


def plot_metrics(metrics: str | Path | list[dict], out: str | Path) -> Path:
    """Draw the training curves of ``metrics`` (a metrics.jsonl path or its records) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (title, series, ylabel, log_scale) in zip(axes.flat, PANELS):
        for key, label in series:
            ax.plot(epochs, [r[key] for r in records], marker="o" if len(epochs) < 30 else None, markersize=3, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    best = max(records, key=lambda r: r["top1"])
    summary = axes.flat[-1]
    summary.axis("off")
    summary.text(0.0, 0.9, f"epochs: {epochs[-1]}\nbest top-1: {best['top1']:.2f}% (epoch {best['epoch']})\n"
                 f"last top-1: {records[-1]['top1']:.2f}%\nlast top-5: {records[-1]['top5']:.2f}%",
                 va="top", family="monospace", fontsize=12)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure to the PNG ``out`` (its folder made when missing) and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vit_fast.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="metrics.jsonl written by vit_fast.train")
    p.add_argument("-o", "--out", help="PNG to write (default: curves.png beside the metrics log)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.metrics).with_name("curves.png")
    if args.out:  # e.g. a file where its directory belongs: one line, not a traceback
        check_output_file(out, "--out")
    try:
        plot_metrics(args.metrics, out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
