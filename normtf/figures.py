"""Figures the README shows: training curves of all variants, misclassified images, the batch-size sweep.

Each is drawn to be read where the README shows it, about 900 pixels wide: few inches and large
type, every axis with labelled ticks, legends outside the data. A *_figure function builds the
figure (the tests measure it); the plot_* function beside it writes it as a PNG.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import ticker  # noqa: E402  (after choosing the headless backend)
from matplotlib.figure import Figure  # noqa: E402

from normtf.files import atomic_write  # noqa: E402

DPI = 150
MAX_GALLERY_IMAGES = 500  # 100 rows of digits: a PNG about 34,000 pixels tall (Agg stops at 65,536)


def save(figure: Figure, path: Path, tight: bool = True) -> Path:
    """Write `figure` as a PNG, whole or not at all; `tight` crops it to what is drawn, else it keeps
    the figure's own size (figures shown side by side must have one size)."""
    atomic_write(Path(path), save_png(figure, tight))
    return Path(path)


def save_png(figure: Figure, tight: bool = True) -> bytes:
    """`figure` as the bytes of a PNG file (save's, for a page that carries its images)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None, facecolor="white")
    return buffer.getvalue()


def epoch_ticks(last: int) -> list[int]:
    """Whole epochs from 1 to `last`, both labelled, and round numbers between them: at most about
    seven labels, none crowding the first or the last."""
    step = next(s for s in (m * 10**e for e in range(9) for m in (1, 2, 5)) if last / s <= 6)
    between = [e for e in range(step, last, step) if e - 1 > step / 2 and last - e > step / 2]
    return [1, *between, last] if last > 1 else [1]


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks to label on a log axis spanning low..high: the sparsest of 1, 2, 5, 3 and then every
    digit per decade that gives at least three, else evenly spaced round values (a narrow range)."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for digits in [(1,), (1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10))]:
        ticks = [d * 10.0**e for e in decades for d in digits if low <= d * 10.0**e <= high]
        if len(ticks) >= 3:
            return ticks
    return [t for t in ticker.MaxNLocator(4).tick_values(low, high) if low <= t <= high]


def _label_log_axis(ax) -> None:
    """Log scale on y with round ticks labelled as plain numbers (0.05, not 5x10^-2), at least three
    of them; the minor ticks stay, unlabelled. Call after the data is drawn and the limits set."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ticks = log_ticks(low, high)
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylim(low, high)


def curves_figure(runs: dict[str, dict], title: str, legend_title: str | None = None) -> Figure:
    """Test (top row) and train (bottom row) loss and accuracy per epoch, all variants on shared axes,
    one legend for all four panels below them.

    `runs` maps a norm name to {"label", "color", "histories": [one list of epoch records per seed]};
    several histories are drawn as their mean with a min-max band.
    """
    figure = Figure(figsize=(10, 8.5), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    panels = [("test_loss", "Test loss (cross-entropy, log scale)", False),
              ("test_accuracy", "Test accuracy (%)", True),
              ("train_loss", "Train loss (running mean, log scale)", False),
              ("train_accuracy", "Train accuracy (%, running mean, augmented)", True)]
    last = max(min(len(h) for h in run["histories"]) for run in runs.values())
    off_scale = _off_scale(runs)
    for ax, (key, label, percent) in zip(axes.flat, panels):
        for name, run in runs.items():
            length = min(len(h) for h in run["histories"])
            epochs = np.arange(1, length + 1)
            values = np.array([[r[key] for r in h[:length]] for h in run["histories"]]) * (100 if percent else 1)
            below = f"; test accuracy {off_scale[name]:.2f}%, below the accuracy panels" if name in off_scale else ""
            ax.plot(epochs, values.mean(axis=0), marker="o", markersize=3, linewidth=1.6, color=run["color"],
                    label=run["label"] + below)
            if len(values) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=run["color"], alpha=0.2)
        ax.set_title(label, fontsize=12)
        ax.set_ylabel("Accuracy (%)" if percent else "Loss (log scale)", fontsize=11)
        ax.tick_params(labelsize=10.5)
        ax.grid(alpha=0.3)
        ax.set_xticks(epoch_ticks(last))
        ax.set_xlim(0.5, last + 0.5)
        if percent:
            ax.set_ylim(_accuracy_floor({n: r for n, r in runs.items() if n not in off_scale}, key), 100)
        else:
            _label_log_axis(ax)
    for ax in axes[1]:
        ax.set_xlabel("Epoch", fontsize=11)
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(runs), 3),
                  fontsize=11, title=legend_title, title_fontsize=11, frameon=False)
    figure.suptitle(title, fontsize=12.5)
    return figure


def plot_curves(runs: dict[str, dict], path: Path, title: str, legend_title: str | None = None) -> Path:
    return save(curves_figure(runs, title, legend_title), path)


OFF_SCALE = 20.0  # points below the best final test accuracy


def _off_scale(runs: dict[str, dict]) -> dict[str, float]:
    """{norm: mean final test accuracy (%)} of the runs that end more than OFF_SCALE points below the
    best: instance norm, which cannot learn in this network, ends at 11% where the others end at 99%,
    and an axis down to 11% would draw every other curve as one line along the top. Their accuracy is
    left below the accuracy panels (their loss is still drawn) and their legend entry says so."""
    finals = {name: 100 * float(np.mean([h[-1]["test_accuracy"] for h in run["histories"] if h]))
              for name, run in runs.items() if any(run["histories"])}
    best = max(finals.values(), default=0.0)
    return {name: final for name, final in finals.items() if final < best - OFF_SCALE}


def _accuracy_floor(runs: dict[str, dict], key: str) -> float:
    """A lower y-limit that shows every point but zooms in on the interesting top of the range."""
    lowest = min((r[key] * 100 for run in runs.values() for h in run["histories"] for r in h), default=90)
    return max(0.0, min(95.0, lowest - 0.5))


GALLERY_CELL, GALLERY_IMAGE = 1.9, 1.7  # inches: the width of a column, the side of a digit
GALLERY_ROW = GALLERY_IMAGE + 0.55  # a digit and its two-line title
GALLERY_CHAR = 0.085  # inches a caption character takes at 11 points, about
GALLERY_HEADER = 0.8  # inches above the first row for the figure's two-line title, whatever the rows


def misclassified_figure(images, labels, predictions, confidences, title: str, columns: int = 5,
                         classes: tuple[str, ...] | None = None) -> Figure:
    """A grid of images, each titled with its true class, the prediction and the model's confidence:
    `columns` wide, or as many as there are images if fewer. Every cell and the title band have a
    fixed size in inches, so a long grid gets no more space under its title than a short one; a
    cell is wider only when class names (Fashion-MNIST's "T-shirt/top") need it."""
    name = (lambda k: classes[k]) if classes else str
    captions = [f"true {name(label)} · pred {name(prediction)}" for label, prediction in zip(labels, predictions)]
    cell = max([GALLERY_CELL] + [GALLERY_CHAR * len(caption) + 0.2 for caption in captions])
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    width, height = cell * columns, GALLERY_HEADER + GALLERY_ROW * rows
    figure = Figure(figsize=(width, height))
    cells = [figure.add_axes(((c * cell + (cell - GALLERY_IMAGE) / 2) / width,
                              (height - GALLERY_HEADER - (r + 1) * GALLERY_ROW) / height,
                              GALLERY_IMAGE / width, GALLERY_IMAGE / height))
             for r in range(rows) for c in range(columns)]
    for ax in cells:
        ax.axis("off")
    for ax, image, caption, p in zip(cells, images, captions, confidences):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{caption}\np = {p:.2f}", fontsize=11, linespacing=1.3)
    if len(images) == 0:
        cells[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    figure.suptitle(title, fontsize=12, y=1 - 0.1 / height, va="top", linespacing=1.4)
    return figure


def plot_misclassified(images, labels, predictions, confidences, path: Path, title: str,
                       classes: tuple[str, ...] | None = None, columns: int = 5) -> Path:
    return save(misclassified_figure(images, labels, predictions, confidences, title, columns, classes), path)


def sweep_figure(panels: list[tuple[str, dict[str, dict], str | None]], title: str) -> Figure:
    """Test error against batch size (log2 axis), one line per variant, as in Wu & He's figure 1;
    panels one under the other on the same batch sizes, each with its own error axis and legend.

    `panels` holds (title, lines, legend title); `lines` maps a name to {"label", "color",
    "batch_sizes": [...], "errors": [percent, ...]}, and optionally "low" and "high" (a band, e.g.
    the lowest and highest seed) and "style" ("-", or "--" and ":" for further measurements of a
    variant, drawn in its color with open markers).
    """
    figure = Figure(figsize=(8, 5.5 + 4.5 * (len(panels) - 1)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    sizes = sorted({size for _, lines, _ in panels for line in lines.values() for size in line["batch_sizes"]})
    for ax, (name, lines, legend_title) in zip(axes, panels):
        for line in lines.values():
            style = line.get("style", "-")
            ax.plot(line["batch_sizes"], line["errors"], marker="o", linewidth=1.8, color=line["color"],
                    linestyle=style, markerfacecolor=line["color"] if style == "-" else "white", label=line["label"])
            if line.get("low") is not None:
                ax.fill_between(line["batch_sizes"], line["low"], line["high"], color=line["color"], alpha=0.2,
                                linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        _label_log_axis(ax)
        ax.set_xlabel("Batch size (images per step, log scale)", fontsize=11)
        ax.set_ylabel("Test error (%, log scale)", fontsize=11)
        ax.tick_params(labelsize=10.5)
        ax.grid(alpha=0.3, which="both")
        if len(panels) > 1:
            ax.set_title(name, fontsize=11)
        if lines:  # none when every run of the sweep failed
            colors = len({line["color"] for line in lines.values()})  # a column per variant when it has several lines
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=10.5,
                      ncols=colors if colors < len(lines) else min(len(lines), 3),
                      frameon=False, title=legend_title, title_fontsize=10.5)
    figure.suptitle(title, fontsize=11)
    return figure


def plot_sweep(panels: list[tuple[str, dict[str, dict], str | None]], path: Path, title: str) -> Path:
    return save(sweep_figure(panels, title), path)


TUNING_TICKS = [0.99, 0.9, 0.5, 0.1, 0.999, 0.995, 0.98, 0.95, 0.8, 0.998]  # accuracies to label, roundest first


def tuning_figure(panels: dict[str, dict], title: str, lr_range: tuple[float, float]) -> Figure:
    """Validation accuracy against learning rate, one panel per variant on shared axes, every trial of
    a tuning a point (normtf tune): a circle for a constant rate, a triangle for one-cycle (at its peak
    rate), the best trial ringed, and a trial whose loss became non-finite an x along the bottom.
    Accuracy is on a logit scale, where 99% to 99.5% is as far as 90% to 95%: the good trials spread
    out at the top and a chance-level one still fits, so the width of each variant's good range shows.

    `panels` maps a variant to {"label", "color", "trials": [{"lr", "schedule", "accuracy" (None: the
    loss became non-finite), "best"}]}; `lr_range`: the learning rates searched, the x axis.
    """
    columns = max(1, min(4, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    figure = Figure(figsize=(3.1 * columns + 0.8, 2.8 * rows + 1.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    accuracies = [t["accuracy"] for p in panels.values() for t in p["trials"] if t["accuracy"] is not None]
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expit = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    low = logit(min(max(min(accuracies, default=0.5), 0.02), 0.9))
    high = logit(min(max(accuracies, default=0.99), 0.9995))
    margin = 0.06 * (high - low) + 0.1
    bottom, top = expit(low - 2.5 * margin), expit(high + margin)  # room for the non-finite trials' marks below
    nonfinite = expit(low - 1.7 * margin)
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes, panels.values()):
        for schedule, marker in [("constant", "o"), ("one-cycle", "^")]:
            done = [t for t in panel["trials"] if t["schedule"] == schedule and t["accuracy"] is not None]
            ax.scatter([t["lr"] for t in done], [min(max(t["accuracy"], bottom), top) for t in done], s=30,
                       marker=marker, color=panel["color"], alpha=0.8, linewidths=0)
        diverged = [t["lr"] for t in panel["trials"] if t["accuracy"] is None]
        ax.scatter(diverged, [nonfinite] * len(diverged), s=30, marker="x", color=panel["color"], linewidths=1.4)
        best = [t for t in panel["trials"] if t["best"]]
        ax.scatter([t["lr"] for t in best], [t["accuracy"] for t in best], s=140, facecolors="none",
                   edgecolors="black", linewidths=1.3)
        ax.set_title(panel["label"], fontsize=11)
        ax.set_xscale("log")
        ax.set_yscale("logit")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9.5)
    ax = axes[0]
    ax.set_ylim(bottom, top)
    ticks = []  # the roundest first, none closer to another than a ninth of the axis
    for tick in (t for t in TUNING_TICKS if bottom <= t <= top):
        if all(abs(logit(other) - logit(tick)) >= (logit(top) - logit(bottom)) / 9 for other in ticks):
            ticks.append(tick)
    ax.set_yticks(ticks, [f"{100 * t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    decades = [10.0**e for e in range(math.floor(math.log10(lr_range[0])), math.ceil(math.log10(lr_range[1])) + 1)]
    ax.set_xticks(decades, [f"{d:g}" for d in decades])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlim(lr_range[0] / 1.4, lr_range[1] * 1.4)
    for i, ax in enumerate(axes[:len(panels)]):
        if i % columns == 0:
            ax.set_ylabel("Validation accuracy (%)", fontsize=10.5)
        if i + columns >= len(panels):
            ax.set_xlabel("Learning rate (peak for one-cycle)", fontsize=10.5)
            ax.xaxis.set_tick_params(labelbottom=True)
    from matplotlib.lines import Line2D

    grey = "0.35"
    handles = [Line2D([], [], marker="o", linestyle="", color=grey, label="constant learning rate"),
               Line2D([], [], marker="^", linestyle="", color=grey, label="one-cycle"),
               Line2D([], [], marker="x", linestyle="", color=grey, label="loss became non-finite"),
               Line2D([], [], marker="o", linestyle="", markersize=11, markerfacecolor="none", markeredgecolor="black",
                      label="best trial")]
    figure.legend(handles=handles, loc="outside lower center", ncols=4 if columns > 2 else 2, fontsize=10.5,
                  frameon=False)
    figure.suptitle(title, fontsize=11.5)
    return figure

