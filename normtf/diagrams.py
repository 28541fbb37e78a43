"""Figures of which activations share one mean and variance: the four of Wu & He 2018, figure 2.

The activation tensor is drawn as a cube: N (samples) across, C (channels) down, and H, W
flattened into the depth axis. Every normalization here pools all of H, W, so what tells them
apart is which (sample, channel) cells of the front face are shaded; the shading runs through
the whole depth. Built with the Figure API (no pyplot), so drawing touches no global state.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

from normtf.figures import save

KINDS = {
    "batch": ("Batch Norm", "BatchNorm.png",
              "one mean and variance per channel:\nC of them, over N×H×W values each"),
    "layer": ("Layer Norm", "LayerNorm.png",
              "one mean and variance per sample:\nN of them, over C×H×W values each"),
    "instance": ("Instance Norm", "InstanceNorm.png",
                 "one mean and variance per sample and channel:\nN×C of them, over H×W values each"),
    "group": ("Group Norm", "GroupNorm.png",
              "one mean and variance per sample and group:\n"
              "N×G of them (G = {groups}), over (C/G)×H×W each"),
}

SAMPLES = 6  # cells drawn along N
CHANNELS = 6  # cells drawn along C; a group count must divide it (the model's, 1 and 2, do)
SIDE = 6.0  # front face is SIDE × SIDE whatever the number of channels drawn
DEPTH = (2.6, 2.1)  # where the back of the cube sits relative to the front: the H, W axis
SHADED = ("#4f8fd6", "#86b4e8", "#3a70b0")  # front, top, right face: lit from above
GREY = ("#ececec", "#f7f7f7", "#d4d4d4")
EDGE, SHADED_EDGE, GROUP_EDGE = "#8a8a8a", "#2b5c96", "#222222"


def shaded_cells(kind: str, n: int, c: int, groups: int) -> set[tuple[int, int]]:
    """The (sample, channel) cells that share one mean and variance; the set at the cube's
    top-left corner, so its extent along the depth shows on the top face too."""
    if kind == "batch":
        return {(s, 0) for s in range(n)}
    if kind == "layer":
        return {(0, ch) for ch in range(c)}
    if kind == "instance":
        return {(0, 0)}
    if kind == "group":
        if groups < 1 or c % groups:
            raise ValueError(f"cannot split {c} channels into {groups} equal groups")
        return {(0, ch) for ch in range(c // groups)}
    raise ValueError(f"unknown normalization {kind!r}; expected one of {', '.join(KINDS)}")


def draw_diagram(kind: str, path: Path, groups: int = 2) -> Path:
    """Render one cube figure to PNG at `path` (written whole or not at all) and return `path`.
    `groups` must divide the CHANNELS drawn: more groups than rows would draw nothing readable."""
    if groups < 1 or CHANNELS % groups:
        raise ValueError(f"cannot split the {CHANNELS} channels drawn into {groups} equal groups")
    n, c = SAMPLES, CHANNELS
    shaded = shaded_cells(kind, n, c, groups)  # also rejects an unknown kind
    title, _, caption = KINDS[kind]
    caption = caption.format(groups=groups)
    w, h = SIDE / n, SIDE / c  # one cell on the front face
    dx, dy = DEPTH

    fig = Figure(figsize=(4.5, 4.5), facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0.15, 1, 0.77))
    ax.set_axis_off()
    ax.set_aspect("equal")

    def paint(corners, side, cell):  # side: 0 front, 1 top, 2 right
        colors, edge = (SHADED, SHADED_EDGE) if cell in shaded else (GREY, EDGE)
        ax.add_patch(Polygon(corners, closed=True, facecolor=colors[side], edgecolor=edge, lw=0.6))

    for s in range(n):
        x = s * w
        for ch in range(c):  # channel 0 is the top row
            y = SIDE - (ch + 1) * h
            paint([(x, y), (x + w, y), (x + w, y + h), (x, y + h)], 0, (s, ch))
        paint([(x, SIDE), (x + w, SIDE), (x + w + dx, SIDE + dy), (x + dx, SIDE + dy)], 1, (s, 0))
    for ch in range(c):
        y = SIDE - (ch + 1) * h
        paint([(SIDE, y), (SIDE + dx, y + dy), (SIDE + dx, y + h + dy), (SIDE, y + h)], 2, (n - 1, ch))

    if kind == "group":  # heavy lines where one group of channels ends and the next begins
        for g in range(1, groups):
            y = SIDE - g * (c // groups) * h
            ax.plot([0, SIDE, SIDE + dx], [y, y, y + dy], color=GROUP_EDGE, lw=1.6, solid_capstyle="butt")
    ax.plot([0, SIDE, SIDE, 0, 0], [0, 0, SIDE, SIDE, 0], color=GROUP_EDGE, lw=1.2)
    ax.plot([SIDE, SIDE + dx, SIDE + dx, dx, 0], [0, dy, SIDE + dy, SIDE + dy, SIDE], color=GROUP_EDGE, lw=1.2)
    ax.plot([SIDE, SIDE + dx], [SIDE, SIDE + dy], color=GROUP_EDGE, lw=1.2)

    label = dict(fontsize=14, ha="center", va="center")
    ax.text(SIDE / 2, -0.55, "N  (batch)", **label)
    ax.text(-0.55, SIDE / 2, "C  (channels)", rotation=90, **label)
    ax.text(SIDE + dx / 2 + 0.45, dy / 2 - 0.35, "H, W  (spatial)", rotation=math.degrees(math.atan2(dy, dx)),
            rotation_mode="anchor", **label)
    ax.set_xlim(-1.0, SIDE + dx + 0.8)
    ax.set_ylim(-1.0, SIDE + dy + 0.2)

    ax.set_title(title, fontsize=18, fontweight="bold", pad=6)
    fig.text(0.5, 0.02, caption, ha="center", va="bottom", fontsize=12.5, color="#333333", linespacing=1.35)

    return save(fig, path, tight=False)  # the four sit side by side in the README: one size


def draw_diagrams(img_dir: Path = Path("img"), groups: int = 2) -> list[Path]:
    """The four README figures, BatchNorm.png, LayerNorm.png, InstanceNorm.png and GroupNorm.png, in `img_dir`."""
    return [draw_diagram(kind, Path(img_dir) / name, groups) for kind, (_, name, _) in KINDS.items()]
