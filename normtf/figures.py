"""Figures the README shows: training curves of all variants, and misclassified digits."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import ticker  # noqa: E402  (after choosing the headless backend)
from matplotlib.figure import Figure  # noqa: E402

from normtf.files import atomic_write  # noqa: E402


def save(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight", facecolor="white")
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def plot_curves(runs: dict[str, dict], path: Path, title: str) -> Path:
    """Test (top row) and train (bottom row) loss and accuracy per epoch, all variants on shared axes.

    `runs` maps a norm name to {"label", "color", "histories": [one list of epoch records per seed]};
    several histories are drawn as their mean with a min-max band.
    """
    figure = Figure(figsize=(12, 8.5))
    axes = figure.subplots(2, 2, sharex=True)
    panels = [("test_loss", "Test loss (cross-entropy)", False), ("test_accuracy", "Test accuracy (%)", True),
              ("train_loss", "Train loss (cross-entropy, running mean)", False),
              ("train_accuracy", "Train accuracy (%, running mean, augmented)", True)]
    for ax, (key, label, percent) in zip(axes.flat, panels):
        for run in runs.values():
            length = min(len(h) for h in run["histories"])
            epochs = np.arange(1, length + 1)
            values = np.array([[r[key] for r in h[:length]] for h in run["histories"]]) * (100 if percent else 1)
            ax.plot(epochs, values.mean(axis=0), marker="o", markersize=3, linewidth=1.6, color=run["color"],
                    label=run["label"])
            if len(values) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=run["color"], alpha=0.2)
        ax.set_title(label)
        ax.set_ylabel(label.split(" (")[0].replace("Test ", "").replace("Train ", "").capitalize())
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins=10))
        if percent:
            ax.set_ylim(_accuracy_floor(runs, key), 100)
        else:
            _plain_log_scale(ax.yaxis)
    for ax in axes[1]:
        ax.set_xlabel("Epoch")
    axes[0, 1].legend(loc="lower right")
    figure.suptitle(title, fontsize=13)
    return save(figure, path)


def _plain_log_scale(axis) -> None:
    """A log axis labelled 0.05, not 5x10^-2; minor ticks labelled at 2, 3 and 5 only."""
    axis.axes.set_yscale("log")
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))


def _accuracy_floor(runs: dict[str, dict], key: str) -> float:
    """A lower y-limit that shows every point but zooms in on the interesting top of the range."""
    lowest = min((r[key] * 100 for run in runs.values() for h in run["histories"] for r in h), default=90)
    return max(0.0, min(95.0, lowest - 0.5))


def plot_misclassified(images, labels, predictions, confidences, path: Path, title: str, columns: int = 5) -> Path:
    """A grid of digits, each titled with its true label, the prediction and the model's confidence."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.8 * columns, 2.9 * rows + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, prediction, p in zip(axes.flat, images, labels, predictions, confidences):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {label} · pred {prediction} (p={p:.2f})", fontsize=9.5)
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    figure.suptitle(title, fontsize=12)
    return save(figure, path)


def plot_sweep(lines: dict[str, dict], path: Path, title: str) -> Path:
    """Test error against batch size (log2 axis), one line per variant, as in Wu & He's figure 1.

    `lines` maps a norm name to {"label", "color", "batch_sizes": [...], "errors": [percent, ...]}.
    """
    figure = Figure(figsize=(8, 5.5))
    ax = figure.subplots()
    for line in lines.values():
        ax.plot(line["batch_sizes"], line["errors"], marker="o", linewidth=1.8, color=line["color"],
                label=line["label"])
    ax.set_xscale("log", base=2)
    sizes = sorted({size for line in lines.values() for size in line["batch_sizes"]})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    _plain_log_scale(ax.yaxis)
    ax.set_xlabel("Batch size (images per step, log scale)")
    ax.set_ylabel("Test error (%, log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize=11)
    return save(figure, path)
