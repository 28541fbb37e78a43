"""`normtf report`: what a runs directory holds, as one HTML page to look at and to send on.

The page is built from the files alone and trains nothing: each run's config.json, history.json
and metrics.json (the results tables, the curves, the provenance), its model.keras evaluated on
the test set (the misclassified images: the one part that needs TensorFlow and the dataset), every
sweep.json under the directory (the batch-size sweep). It opens offline in any browser: the
plotting library's JavaScript and every image are inside the file, nothing is fetched.

Bokeh draws the curves (bokeh.embed.components, its JavaScript inlined). Of the three libraries
made for this, Bokeh's JavaScript ships inside its Python package and a page that carries it
weighs about 1.4 MB; Plotly's page carries all of plotly.js, 4.9 MB, and Altair ships no
JavaScript of its own (it inlines Vega only through vl-convert-python, an 84 MB runtime), so
Bokeh keeps a mailable page and a light install (docs/how-it-works.md, "The report").

A run that cannot be read (a missing or corrupt file, a run from an older normtf with fewer
files) is named in the page and left out of what needs that file; it never stops the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from normtf import data
from normtf.config import RECIPES, SWEEP_EPOCHS, SWEEP_SEEDS, SWEEP_TRAIN_SIZE, TrainConfig, recipe
from normtf.errors import CorruptFile, NormtfError
from normtf.figures import OFF_SCALE, log_ticks
from normtf.files import atomic_write, read_json
from normtf.norms import NORMS, color, relevant
from normtf.precise_bn import ERROR as MOVING, MEASURES, PRECISE, PRECISE_DROPOUT_ON
from normtf.runs import summarize

RUN_FILES = ("config.json", "history.json", "metrics.json", "model.keras")


# --- What the directory holds -------------------------------------------------------------------

@dataclass
class Run:
    """One run directory as found on disk; `problems` says what could not be read."""
    path: Path
    norm: str
    seed: int | None
    record: dict = field(default_factory=dict)  # config.json as stored
    config: TrainConfig | None = None
    history: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.config is not None and bool(self.metrics) and self.metrics.get("status", "finished") == "finished"

    @property
    def model(self) -> Path:
        return self.path / "model.keras"


@dataclass
class Study:
    """The runs of one runs directory (what one `normtf compare --runs-dir` writes) on one dataset."""
    directory: Path  # the --runs-dir the runs were trained into
    dataset: str
    runs: list[Run]
    per_seed: bool  # <norm>/seed-<s>/ (compare --seeds), else <norm>/

    @property
    def key(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.directory}-{self.dataset}".lower()).strip("-")


def read_run(path: Path, norm: str) -> Run:
    """A run's files, each read on its own: a missing or corrupt one is a problem of the run, not
    of the page. A run without metrics.json is unfinished (or was interrupted); without
    config.json nothing says how it was trained."""
    seed = int(path.name[5:]) if re.fullmatch(r"seed-\d+", path.name) else None
    run = Run(path, norm, seed)
    try:
        run.record = read_json(path / "config.json") or {}
        if not run.record:
            run.problems.append("no config.json: nothing says how it was trained")
        else:
            run.config = relevant(TrainConfig.from_dict(run.record["config"]))
            run.seed = run.config.seed
    except (CorruptFile, KeyError, TypeError, ValueError) as e:
        run.problems.append(_reason("config.json", e))
    try:
        history = read_json(path / "history.json")
        if history is None:
            run.problems.append("no history.json: no curves")
        elif not isinstance(history, list) or not all(isinstance(r, dict) and "epoch" in r for r in history):
            run.problems.append("history.json does not hold a list of epoch records")
        else:
            run.history = history
    except CorruptFile as e:
        run.problems.append(_reason("history.json", e))
    try:
        metrics = read_json(path / "metrics.json")
        if metrics is None:
            run.problems.append("no metrics.json: unfinished, interrupted or still training")
        elif not isinstance(metrics, dict):
            run.problems.append("metrics.json does not hold a run's metrics")
        else:
            if run.history and metrics.get("status", "finished") == "finished":
                try:  # what an older normtf did not write, from the epochs
                    metrics = {**summarize(run.history), **metrics}
                except (KeyError, TypeError, ValueError):
                    pass
            run.metrics = metrics
            if metrics.get("status") not in (None, "finished"):
                reason = (metrics.get("failure") or {}).get("reason", "")
                run.problems.append(f"status {metrics.get('status')}" + (f": {reason}" if reason else ""))
    except CorruptFile as e:
        run.problems.append(_reason("metrics.json", e))
    if run.finished and not run.model.is_file():
        run.problems.append("no model.keras: no misclassified images")
    return run


def _reason(name: str, error: Exception) -> str:
    return f"{name} is unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def _holds_a_run(directory: Path) -> bool:
    return any((directory / name).exists() for name in RUN_FILES)


def find_studies(root: Path) -> list[Study]:
    """Every <dir>/<norm>/ and <dir>/<norm>/seed-<s>/ run under `root`, at any depth, grouped by the
    runs directory they were trained into (<dir>; a dataset other than MNIST in <dir>/<dataset>/).
    A sweep's runs (batch-<size>/<norm>/...) are the sweep's, a tuning's trials (trial-<n>/<norm>/)
    the tuning's: their JSON summarizes them."""
    groups: dict[tuple[Path, str, bool], list[Run]] = {}
    for directory, subdirectories, _ in os.walk(root):
        directory = Path(directory)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".")
                                   and d not in ("img", "checkpoint", "replaced") and not re.fullmatch(r"(batch|trial)-\d+", d))
        for norm in [d for d in subdirectories if d in NORMS]:
            path = directory / norm
            seeded = sorted((p for p in path.glob("seed-*") if p.is_dir() and _holds_a_run(p)),
                            key=lambda p: (len(p.name), p.name))
            runs = [read_run(p, norm) for p in seeded] if seeded else [read_run(path, norm)] if _holds_a_run(path) else []
            base, dataset = directory, data.DEFAULT
            if directory.name in data.DATASETS and directory.name != data.DEFAULT:
                base, dataset = directory.parent, directory.name
            for run in runs:
                on = run.config.dataset if run.config else dataset
                groups.setdefault((base, on, bool(seeded)), []).append(run)
        subdirectories[:] = [d for d in subdirectories if d not in NORMS]
    order = list(data.DATASETS)
    studies = [Study(base, dataset, runs, per_seed) for (base, dataset, per_seed), runs in groups.items()]
    return sorted(studies, key=lambda s: (order.index(s.dataset), len(s.directory.parts), str(s.directory), not s.per_seed))


# --- The numbers --------------------------------------------------------------------------------

def recipe_of(config: TrainConfig) -> tuple[str, list[str]]:
    """The recipe a run's config is closest to, and the flags that make the rest of the difference:
    (name, ["--epochs", "2", ...]); a run of a recipe as it stands has no flags."""
    best = None
    for name in RECIPES:
        target = relevant(recipe(name).replace(norm=config.norm, seed=config.seed, dataset=config.dataset))
        flags = []
        for key, value in vars(config).items():
            if value != getattr(target, key) and value is not None:
                option = "--" + key.replace("_", "-")
                flags += [option] if value is True else [f"--no-{option[2:]}"] if value is False else [option, f"{value:g}" if isinstance(value, float) else str(value)]
        if best is None or len(flags) < len(best[1]):
            best = (name, flags)
    return best


@dataclass
class Row:
    """A results table's row: one variant under one recipe, its finished runs (one per seed)."""
    norm: str
    recipe: str
    flags: list[str]
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def recipe_label(self) -> str:
        return " ".join([self.recipe, *self.flags])

    def cells(self) -> list[str]:
        """variant, recipe, params, seeds, final test acc (%) mean ± std, each seed, best (%) mean:
        as the README's tables give them."""
        finals = [100 * r.metrics["final_test_accuracy"] for r in self.runs]
        spread = f" ± {statistics.stdev(finals):.2f}" if len(finals) > 1 else ""
        params = self.runs[0].metrics.get("trainable_params", self.runs[0].record.get("trainable_params"))
        return [self.norm, self.recipe_label, f"{params:,}" if isinstance(params, int) else "–",
                ", ".join(map(str, self.seeds)), f"{statistics.fmean(finals):.2f}{spread}",
                ", ".join(f"{v:.2f}" for v in finals),
                f"{statistics.fmean(100 * r.metrics['best_test_accuracy'] for r in self.runs):.2f}"
                if all("best_test_accuracy" in r.metrics for r in self.runs) else "–"]


def rows(study: Study) -> list[Row]:
    """The study's finished runs as table rows, variants in normtf's order (norms.NORMS)."""
    found: dict[tuple[str, str, tuple], Row] = {}
    for run in study.runs:
        if run.finished and "final_test_accuracy" in run.metrics:
            name, flags = recipe_of(run.config)
            found.setdefault((run.norm, name, tuple(flags)), Row(run.norm, name, flags, [])).runs.append(run)
    return sorted(found.values(), key=lambda row: (list(RECIPES).index(row.recipe), list(NORMS).index(row.norm)))


def commands(study: Study, table: list[Row]) -> list[str]:
    """The `normtf compare` commands that train (or, run again, reuse) the table's runs."""
    groups: dict[tuple, list[str]] = {}
    for row in table:
        groups.setdefault((row.recipe, tuple(row.flags), tuple(row.seeds)), []).append(row.norm)
    lines = []
    for (name, flags, seeds), norms in groups.items():
        words = ["normtf", "compare", *[w for norm in norms for w in ("--norm", norm)]]
        words += ["--recipe", name] if name != "reference" else []
        words += list(flags) + (["--dataset", study.dataset] if study.dataset != data.DEFAULT else [])
        if study.per_seed:
            first = TrainConfig().seed
            words += ["--seeds", str(len(seeds)) if list(seeds) == list(range(first, first + len(seeds)))
                      else ",".join(map(str, seeds))]
        elif seeds[0] != TrainConfig().seed:
            words += ["--seed", str(seeds[0])]
        lines.append(" ".join(words + ["--runs-dir", str(study.directory)]))
    return lines


def sweep_points(summary: dict) -> tuple[dict, list[str], int]:
    """{(norm, batch size, measure): [(seed, value), ...]} of the sweep's finished rows, every
    numeric test-error field (test_error_percent*) a measure, in the order the rows first show
    them; and the count of rows that could not be read. A file written before --seeds has one
    "seed" for all rows."""
    points, measures, unreadable = {}, [], 0
    for row in summary.get("rows") or []:
        try:
            norm, size = str(row["norm"]), int(row["batch_size"])
        except (KeyError, TypeError, ValueError):
            unreadable += 1
            continue
        if row.get("status", "finished") != "finished":
            continue
        for key, value in row.items():
            if key.startswith("test_error_percent") and _is_number(value):
                measures += [key] if key not in measures else []
                points.setdefault((norm, size, key), []).append((row.get("seed", summary.get("seed")), float(value)))
    order = [MOVING, PRECISE_DROPOUT_ON, PRECISE]
    return points, sorted(measures, key=lambda m: order.index(m) if m in order else len(order)), unreadable


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measure_name(measure: str) -> str:
    """How a test-error field of the sweep is named on the page: the two normtf.sweep writes by
    their meaning, any other by its own name's words."""
    return MEASURES.get(measure, measure.removeprefix(MOVING).strip("_").replace("_", " ") or measure)


def sweep_command(summary: dict, path: Path) -> str:
    """The `normtf sweep` that measures what the file holds (written into `path`)."""
    budget = summary.get("budget") or {}
    norms = list(dict.fromkeys(str(r.get("norm")) for r in summary.get("rows") or [] if isinstance(r, dict) and r.get("norm")))
    sizes = sorted({r["batch_size"] for r in summary.get("rows") or [] if isinstance(r, dict) and "batch_size" in r})
    seeds = summary.get("seeds") or [summary.get("seed", TrainConfig().seed)]
    words = ["normtf", "sweep", *[w for norm in norms for w in ("--norm", norm)]]
    if sizes:
        words += ["--batch-sizes", ",".join(map(str, sizes))]
    if summary.get("dataset", data.DEFAULT) != data.DEFAULT:
        words += ["--dataset", summary["dataset"]]
    if budget.get("epochs", SWEEP_EPOCHS) != SWEEP_EPOCHS:
        words += ["--epochs", str(budget["epochs"])]
    if budget.get("train_size", SWEEP_TRAIN_SIZE) != SWEEP_TRAIN_SIZE:
        words += ["--train-size", str(budget["train_size"])]
    first = seeds[0]
    if seeds != list(range(first, first + SWEEP_SEEDS)) or first != TrainConfig().seed:
        words += ["--seeds", ",".join(map(str, seeds))]
    if summary.get("lr_scaled") is False:
        words += ["--no-scale-lr"]
    dropout = (summary.get("recipe") or {}).get("dropout", TrainConfig().dropout)
    if dropout != TrainConfig().dropout:
        words += ["--dropout", f"{dropout:g}"]
    return " ".join(words + ["--out", str(path)])


# --- The page -----------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _hex(norm: str) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color(norm)) if norm in NORMS else "#444444"


def curves_plots(study: Study):
    """Test and train loss and accuracy per epoch, one panel each, every variant: the mean over its
    seeds, the band from the lowest to the highest seed, every value on hover. One legend for all
    four panels: a click on a variant hides or shows it in each. A variant that ends more than
    OFF_SCALE points below the best starts hidden (instance norm, at 11%, would flatten the others)."""
    from bokeh.layouts import gridplot
    from bokeh.models import ColumnDataSource, FixedTicker, HoverTool, Legend, LegendItem
    from bokeh.plotting import figure

    runs: dict[str, list[Run]] = {}
    for run in study.runs:
        if run.finished and run.history:
            runs.setdefault(run.norm, []).append(run)
    if not runs:
        return None
    runs = dict(sorted(runs.items(), key=lambda kv: list(NORMS).index(kv[0])))
    finals = {norm: 100 * statistics.fmean(r.history[-1]["test_accuracy"] for r in group) for norm, group in runs.items()}
    hidden = {norm for norm, final in finals.items() if final < max(finals.values()) - OFF_SCALE}
    panels = [("test_loss", "Test loss (cross-entropy)", False), ("test_accuracy", "Test accuracy (%)", True),
              ("train_loss", "Train loss (running mean)", False), ("train_accuracy", "Train accuracy (%, running mean, augmented)", True)]
    figures, items = [], {norm: [] for norm in runs}
    for key, title, percent in panels:
        plot = figure(title=title, frame_width=360, frame_height=240, y_axis_type="linear" if percent else "log",
                      tools="pan,box_zoom,wheel_zoom,reset,save", toolbar_location="above", x_axis_label="Epoch",
                      y_axis_label="Accuracy (%)" if percent else "Loss (log scale)")
        plot.y_range.only_visible = plot.x_range.only_visible = True
        plot.toolbar.logo = None
        lines = []
        for norm, group in runs.items():
            length = min(len(r.history) for r in group)
            scale = 100 if percent else 1
            values = [[scale * r.history[e][key] for r in group] for e in range(length) if all(key in r.history[e] for r in group)]
            if not values:
                continue
            source = ColumnDataSource({
                "epoch": list(range(1, len(values) + 1)), "mean": [_round(statistics.fmean(v)) for v in values],
                "low": [_round(min(v)) for v in values], "high": [_round(max(v)) for v in values],
                "each": [", ".join(f"{x:.2f}" if percent else f"{x:.4f}" for x in v) for v in values],
                "variant": [norm] * len(values)})
            visible = norm not in hidden
            band = plot.varea("epoch", "low", "high", source=source, color=_hex(norm), fill_alpha=0.2, visible=visible)
            line = plot.line("epoch", "mean", source=source, color=_hex(norm), line_width=2, visible=visible)
            dots = plot.scatter("epoch", "mean", source=source, color=_hex(norm), size=5, visible=visible)
            items[norm] += [band, line, dots]
            lines.append(dots)
        unit = "{0.00}" if percent else "{0.0000}"
        several = any(len(g) > 1 for g in runs.values())
        if not percent:
            plot.yaxis.ticker = FixedTicker(ticks=log_ticks(*_span(runs, key)))
        plot.add_tools(HoverTool(renderers=lines, tooltips=[("variant", "@variant"), ("epoch", "@epoch")] + (
            [("mean", f"@mean{unit}"), ("seeds' range", f"@low{unit} to @high{unit}"), ("each seed", "@each")]
            if several else [("value", f"@mean{unit}")])))
        figures.append(plot)
    legend = Legend(items=[LegendItem(label=f"{norm} ({len(runs[norm])} seed{'s' if len(runs[norm]) > 1 else ''})"
                                      + (f": ends at {finals[norm]:.2f}%, starts hidden" if norm in hidden else ""),
                                      renderers=items[norm]) for norm in runs],
                    click_policy="hide", title="click to hide or show" + ("; band: lowest to highest seed" if several else ""))
    figures[1].add_layout(legend, "right")
    return gridplot([figures[:2], figures[2:]], merge_tools=False, toolbar_location=None)


def _span(runs: dict[str, list[Run]], key: str) -> tuple[float, float]:
    """The lowest and highest positive value of `key` in any epoch of these runs."""
    values = [r[key] for group in runs.values() for run in group for r in run.history if _is_number(r.get(key)) and r[key] > 0]
    return (min(values), max(values)) if values else (0.01, 1.0)


def _round(value: float) -> float:
    """Six significant digits: what a reader can see, and a third of the page's size."""
    return float(f"{value:.6g}")


def sweep_plot(summary: dict, points: dict, measures: list[str]):
    """Test error against batch size (both axes logarithmic), one line per variant and measure:
    solid for the moving averages, dashed and dotted for the others, the seeds' band under each
    solid line, every point's mean, spread and seeds on hover."""
    from bokeh.models import ColumnDataSource, FixedTicker, HoverTool, Legend, LegendItem
    from bokeh.plotting import figure

    sizes = sorted({size for _, size, _ in points})
    plot = figure(frame_width=640, frame_height=380, x_axis_type="log", y_axis_type="log",
                  x_axis_label="Batch size (log scale)", y_axis_label="Test error (%, log scale)",
                  tools="pan,box_zoom,wheel_zoom,reset,save", toolbar_location="above")
    plot.xaxis.ticker = FixedTicker(ticks=sizes)
    values = [v for seeds in points.values() for _, v in seeds if v > 0]
    plot.yaxis.ticker = FixedTicker(ticks=log_ticks(min(values), max(values))) if values else plot.yaxis.ticker
    plot.y_range.only_visible = True
    plot.toolbar.logo = None
    dashes = ["solid", "dashed", "dotted", "dotdash", "dashdot"]
    norms = list(dict.fromkeys(norm for norm, _, _ in points))
    items, dots = [], []
    for norm in norms:
        for m, measure in enumerate(measures):
            series = [(size, points[norm, size, measure]) for size in sizes if (norm, size, measure) in points]
            if not series:
                continue
            values = [[v for _, v in seeds] for _, seeds in series]
            source = ColumnDataSource({
                "batch": [size for size, _ in series], "mean": [_round(statistics.fmean(v)) for v in values],
                "low": [_round(min(v)) for v in values], "high": [_round(max(v)) for v in values],
                "std": [_round(statistics.stdev(v)) if len(v) > 1 else float("nan") for v in values],
                "each": [", ".join(f"{v:.2f} ({s})" for s, v in seeds) for _, seeds in series],
                "name": [f"{norm}, {measure_name(measure)}"] * len(series)})
            renderers = [plot.line("batch", "mean", source=source, color=_hex(norm), line_width=2, line_dash=dashes[m % len(dashes)])]
            renderers.append(plot.scatter("batch", "mean", source=source, color=_hex(norm), size=7,
                                          fill_color=_hex(norm) if m == 0 else "white"))
            if m == 0 and any(len(v) > 1 for v in values):
                renderers.append(plot.varea("batch", "low", "high", source=source, color=_hex(norm), fill_alpha=0.15))
            dots.append(renderers[1])
            several = sum(1 for x in measures if any((norm, s, x) in points for s in sizes)) > 1
            items.append(LegendItem(label=f"{norm}, {measure_name(measure)}" if several else norm, renderers=renderers))
    plot.add_tools(HoverTool(renderers=dots, tooltips=[
        ("", "@name"), ("batch size", "@batch"), ("test error (%)", "@mean{0.00} ± @std{0.00}"),
        ("seeds' range", "@low{0.00} to @high{0.00}"), ("each seed", "@each")]))
    plot.add_layout(Legend(items=items, click_policy="hide", title="click to hide or show"), "right")
    return plot


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0 auto;
       max-width: 1180px; padding: 0 24px 48px; }
h1 { margin-top: 28px; } h2 { margin-top: 40px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { margin-top: 28px; } code, pre { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f6f8fa; padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; } .note { color: #555; } .problem { color: #a00; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 18px; }
figure.digit { margin: 0; text-align: center; font-size: 12px; width: 96px; }
figure.digit img { width: 84px; height: 84px; image-rendering: pixelated; border: 1px solid #ccc; }
details { margin: 2px 0; } summary { cursor: pointer; }
img.figure { max-width: 100%; }
"""


def table_html(header: list[str], body: list[list[str]], css: str = "", left: int = 1) -> str:
    """A table of already escaped cells; the first `left` columns align left."""
    align = lambda i: ' class="text"' if i < left else ""  # noqa: E731
    head = "".join(f"<th{align(i)}>{h}</th>" for i, h in enumerate(header))
    lines = "".join("<tr>" + "".join(f"<td{align(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in body)
    return f'<div class="scroll"><table{css}><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table></div>'


RESULTS_HEADER = ["variant", "recipe", "params", "seeds", "final test acc (%), mean ± std", "each seed", "best (%), mean"]


def results_html(study: Study, table: list[Row]) -> str:
    if not table:
        return '<p class="note">No finished run here (see the runs that could not be read, above).</p>'
    body = [[f"<code>{esc(c[0])}</code>", *map(esc, c[1:])] for c in (row.cells() for row in table)]
    return (table_html(RESULTS_HEADER, body, f' id="results-{study.key}"', left=2)
            + "<p>Made by:</p><pre>" + "\n".join(map(esc, commands(study, table))) + "</pre>")


def digit_png(image) -> str:
    """A 28x28 uint8 image as a data: URI, dark ink on white as the gallery figures draw it."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(255 - np.asarray(image, dtype=np.uint8), mode="L").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Galleries:
    """Each variant's misclassified test images: the model evaluated on the test set, which needs
    TensorFlow and the dataset (loaded as `normtf gallery` loads it: the cache, else fetched, or
    --data-dir). A dataset that cannot be loaded or a model that cannot be evaluated is said in
    the page, where its images would be."""

    def __init__(self, count: int, data_dir: Path | None, warn):
        self.count, self.data_dir, self.warn = count, data_dir, warn
        self.datasets: dict[str, object] = {}

    def images(self, name: str):
        if name not in self.datasets:
            try:
                self.datasets[name] = data.load(name, self.data_dir, warn=self.warn)
            except NormtfError as e:
                self.datasets[name] = str(e).splitlines()[0]
                self.warn(f"no misclassified images of {data.DATASETS[name].title} runs: {self.datasets[name]}")
        return self.datasets[name]

    def html(self, study: Study) -> str:
        first: dict[str, Run] = {}
        for run in study.runs:
            if run.finished and run.norm not in first:
                first[run.norm] = run
        if not first:
            return ""
        title = data.DATASETS[study.dataset].title
        images = self.images(study.dataset)
        if isinstance(images, str):
            return (f'<p class="problem">The misclassified images need the {esc(title)} test set to evaluate each '
                    f"model, and it could not be loaded: {esc(images)}. Run <code>normtf data"
                    f"{' --dataset ' + study.dataset if study.dataset != data.DEFAULT else ''}</code> (or give "
                    "<code>--data-dir</code>), then this command again.</p>")
        from normtf import quiet

        quiet.start_tensorflow()
        from normtf.evaluation import evaluate_file  # loads Keras: only once there is a model to evaluate

        parts = []
        for norm, run in sorted(first.items(), key=lambda kv: list(NORMS).index(kv[0])):
            heading = f"<h4><code>{esc(norm)}</code>, seed {esc(run.seed)}</h4>"
            try:
                evaluation = evaluate_file(run.model, images, run.config.test_size)
            except NormtfError as e:
                parts.append(heading + f'<p class="problem">{esc(str(e).splitlines()[0])}</p>')
                continue
            wrong = evaluation.misclassified(self.count)
            total = evaluation.total - evaluation.correct
            shown = ("none of its" if total == 0 else f"all {total:,}" if len(wrong) == total
                     else f"the first {len(wrong):,} of its {total:,}")
            classes = evaluation.classes
            cells = "".join(
                f'<figure class="digit"><img alt="true {esc(classes[evaluation.labels[i]])}, predicted '
                f'{esc(classes[evaluation.predictions[i]])}" src="{digit_png(evaluation.images[i])}">'
                f"<figcaption>true {esc(classes[evaluation.labels[i]])} · pred {esc(classes[evaluation.predictions[i]])}"
                f"<br>p = {evaluation.probabilities[i].max():.2f}</figcaption></figure>" for i in wrong)
            parts.append(heading + f"<p>test accuracy {100 * evaluation.accuracy:.2f}%: {shown} misclassified "
                                   f"{esc(title)} test images{', in test-set order' if total else ''}</p><div class=\"gallery\">{cells}</div>")
        return "".join(parts)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def provenance_html(study: Study, root: Path) -> str:
    """Per run: its status, code, libraries, device, data checksums and training time; its whole
    config.json under it. What an older normtf did not record is said to be missing."""
    body = []
    for run in study.runs:
        record = run.record
        env, code, stored = record.get("environment") or {}, record.get("normtf") or {}, record.get("data") or {}
        missing = '<span class="note">not recorded</span>'
        status = (run.metrics or {}).get("status", "finished") if run.metrics else "no metrics.json"
        times = [r.get("epoch_time") for r in run.history if _is_number(r.get("epoch_time"))]
        commit = code.get("commit")
        normtf = esc(code.get("version", "")) + (f" <code>{esc(commit[:10])}</code>" if commit else "")
        if code.get("uncommitted_changes"):
            normtf += " + uncommitted changes"
        libraries = ", ".join(f"{name} {esc(env[key])}" for key, name in
                              [("tensorflow", "TensorFlow"), ("keras", "Keras"), ("numpy", "NumPy"), ("python", "Python")] if key in env)
        checksums = stored.get("sha256") or {}
        name = stored.get("dataset", run.config.dataset if run.config else None)
        known = data.DATASETS.get(name)
        if not checksums:
            files = missing
        elif known and checksums == known.files:
            files = f"the standard {esc(known.title)} files (SHA-256 of all {len(checksums)})"
        else:
            files = "other files: " + ", ".join(f"{esc(k)} {esc(v[:12])}…" for k, v in sorted(checksums.items()))
        details = (f"<details><summary>config.json</summary><pre>{esc(json.dumps(record, indent=2, sort_keys=True))}</pre>"
                   "</details>") if record else missing
        device = esc(env["device"]) + (f", {esc(env['precision'])}" if env.get("precision") else "") + (
            ", XLA" if env.get("jit_compile") else "") if env.get("device") else missing
        body.append([f"<code>{esc(run.path.relative_to(root) if run.path.is_relative_to(root) else run.path)}</code>",
                     esc(status), normtf if code else missing, libraries or missing, device, files,
                     f"{_duration(sum(times))} ({statistics.fmean(times):.1f} s an epoch, {len(times)} epochs)" if times else missing,
                     details])
    return table_html(["run", "status", "normtf", "libraries", "device", "data", "training time", "config"], body, left=8)


def tuning_html(root: Path) -> str:
    """Each tuning under `root` (its tune.json, what `normtf tune` found): its budget, each variant's
    best trial and recipe, and validation accuracy against learning rate, every trial a point (the
    figure `normtf tune` draws). Empty when the directory holds no tuning."""
    found = sorted(p for p in Path(root).rglob("tune.json") if not any(part.startswith(".") for part in p.parts))
    parts = []
    for number, path in enumerate(found):
        try:
            summary = read_json(path)
            fixed, variants = summary["settings"]["fixed"], summary["variants"]
        except (CorruptFile, KeyError, TypeError) as e:
            parts.append(f"<p><code>{esc(path)}</code> could not be read ({esc(str(e).splitlines()[0])}).</p>")
            continue
        from normtf.figures import save_png, tuning_figure
        from normtf.tune import tuning_panels

        body = []
        for norm, variant in variants.items():
            told = [t for t in variant["trials"] if t["state"] in ("finished", "diverged")]
            best = variant["best"]
            if best is None:
                body.append([f"<code>{esc(norm)}</code>", str(len(told)), "-", "-", "-", "-", "-", "-"])
                continue
            params = best["params"]
            body.append([f"<code>{esc(norm)}</code>", f"{len(told)} ({sum(t['state'] == 'diverged' for t in told)})",
                         f"{100 * best['validation_accuracy']:.2f}", str(best["number"]), f"{params['lr']:.3g}",
                         esc(params["schedule"]), f"{params['dropout']:.3f}",
                         f"{params['l1']:.2g}" if "l1" in params else "-"])
        epochs = fixed["epochs"]
        png = base64.b64encode(save_png(tuning_figure(*tuning_panels(summary)))).decode()
        parts.append(
            f"<h3><code>{esc(path.parent)}</code></h3>"
            f"<p>Each variant's own recipe, searched by <code>normtf tune --runs-dir {esc(path.parent)}</code>: "
            f"{summary['trials']} trials a variant, each {epochs} epoch{'s' if epochs != 1 else ''} of "
            f"{summary['train_images']:,} training images, measured on {fixed['validation']:,} images held out of "
            "the training set. The accuracies here are on those held-out images: the test set is not used to choose. "
            "<code>--recipe best</code> trains each variant with its best trial's recipe.</p>"
            + table_html(["variant", "trials (diverged)", "best validation acc (%)", "trial", "lr (peak)", "schedule",
                          "dropout", "L1"], body, f' id="tuning-table-{number}"')
            + f'<p><img class="figure" alt="validation accuracy against learning rate, every trial" '
              f'src="data:image/png;base64,{png}"></p>')
    return '<h2 id="tuning">Tuning: each variant at its best</h2>' + "".join(parts) if parts else ""


@dataclass
class Report:
    path: Path
    studies: list[Study]
    sweeps: list[Path]
    problems: list[str]
    size: int


def build(root: Path, out: Path, count: int = 10, data_dir: Path | None = None, warn=lambda message: None) -> Report:
    """Write the page for everything under `root` to `out`: a NormtfError if there is nothing to show."""
    root = Path(root)
    if not root.is_dir():
        raise NormtfError(f"--runs-dir {root} is not a directory; name the directory your runs are in (default: runs)")
    studies = find_studies(root)
    sweep_files = sorted(p for p in root.rglob("sweep.json") if not any(part.startswith(".") for part in p.parts))
    tuning = tuning_html(root)
    if not studies and not sweep_files and not tuning:
        raise NormtfError(f"no runs in {root}: nothing to report; train first (normtf compare --all), or name the "
                          "directory that holds them with --runs-dir")
    problems = [f"<code>{esc(run.path)}</code>: {esc('; '.join(run.problems))}"
                for study in studies for run in study.runs if run.problems]
    galleries = Galleries(count, data_dir, warn)
    models, sections, toc = [], [], []

    for dataset in data.DATASETS:
        ours = [s for s in studies if s.dataset == dataset]
        if not ours:
            continue
        title = data.DATASETS[dataset].title
        toc.append(f'<li><a href="#{dataset}">{esc(title)}</a></li>')
        parts = [f'<h2 id="{dataset}">{esc(title)}</h2>']
        for study in ours:
            table = rows(study)
            plot = curves_plots(study)
            parts.append(f'<h3 id="{study.key}">{esc(title)}: <code>{esc(study.directory)}</code></h3>'
                         + results_html(study, table))
            if plot is not None:
                models.append(plot)
                parts.append(f'<h4>Curves</h4><div class="curves" data-study="{study.key}">{{plot{len(models) - 1}}}</div>')
            gallery = galleries.html(study)
            if gallery:
                parts.append(f'<h4>Misclassified test images</h4><div class="galleries" data-study="{study.key}">{gallery}</div>')
            parts.append(f"<h4>Runs</h4>{provenance_html(study, root)}")
        sections.append("".join(parts))

    sweep_parts = []
    for path in sweep_files:
        try:
            summary = read_json(path)
            if not isinstance(summary, dict):
                raise CorruptFile(f"{path} does not hold a sweep")
        except CorruptFile as e:
            problems.append(f"<code>{esc(path)}</code>: {esc(str(e).splitlines()[0])}")
            continue
        points, measures, unreadable = sweep_points(summary)
        if unreadable:
            problems.append(f"<code>{esc(path)}</code>: {unreadable} of its rows could not be read")
        if not points:
            problems.append(f"<code>{esc(path)}</code>: no finished run in this sweep")
            continue
        models.append(sweep_plot(summary, points, measures))
        sweep_parts.append(sweep_html(summary, path, points, measures, len(models) - 1))
    if sweep_parts:
        toc.append('<li><a href="#sweep">Batch-size sweep</a></li>')
        sections.append('<h2 id="sweep">Batch-size sweep</h2>' + "".join(sweep_parts))
    if tuning:
        toc.append('<li><a href="#tuning">Tuning study</a></li>')
        sections.append(tuning)

    from bokeh.embed import components
    from bokeh.embed.bundle import bundle_for_objs_and_resources
    from bokeh.resources import INLINE

    script, divs = components(models) if models else ("", ())
    resources = "".join(bundle_for_objs_and_resources(models, INLINE)) if models else ""
    body = "".join(sections)
    for i, div in enumerate(divs):
        body = body.replace(f"{{plot{i}}}", div)
    command = f"normtf report --runs-dir {root} --out {out}" + (f" --count {count}" if count != 10 else "")
    head = (f"<h1>normtf: <code>{esc(root)}</code></h1>"
            f"<p>Everything in <code>{esc(root)}</code>, from its files: made by <code>{esc(command)}</code>, "
            "which trains nothing. It opens offline; every script and image is in this one file.</p>"
            "<p><b>final</b>: the test accuracy after the last epoch. <b>best</b>: the highest test accuracy over "
            "the epochs, picked on the test set as the study reports it, so optimistic by construction. With "
            "several seeds: the mean ± the sample standard deviation over them, and each seed's value.</p>"
            + (f"<ul>{''.join(toc)}</ul>" if toc else ""))
    if problems:
        head += ('<h2 id="problems">Runs that could not be read whole</h2><p>Left out of what needs the missing '
                 'file; everything else of them is shown.</p><ul class="problem">'
                 + "".join(f"<li>{p}</li>" for p in problems) + "</ul>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>normtf: {esc(root)}</title>\n<style>{STYLE}</style>\n{resources}\n</head>\n<body>\n"
            f"{head}\n{body}\n{script}\n</body>\n</html>\n")
    page = stable_ids(page)
    atomic_write(Path(out), page)
    return Report(Path(out), studies, sweep_files, problems, len(page.encode()))


def sweep_html(summary: dict, path: Path, points: dict, measures: list[str], plot: int) -> str:
    """A sweep's figure and its table: per batch size and (variant, measure), the mean ± sample std
    over the seeds and each seed's value, as docs/results.md gives them."""
    budget = summary.get("budget") or {}
    sizes = sorted({size for _, size, _ in points})
    norms = list(dict.fromkeys(norm for norm, _, _ in points))
    columns = [(norm, m) for norm in norms for m in measures if any((norm, s, m) in points for s in sizes)]
    several = {norm: sum(1 for n, _ in columns if n == norm) > 1 for norm in norms}
    lrs = {}
    for row in summary.get("rows") or []:
        if isinstance(row, dict) and "batch_size" in row and _is_number(row.get("lr")):
            lrs.setdefault(row["batch_size"], row["lr"])

    def cell(norm, size, measure):
        seeds = points.get((norm, size, measure))
        if not seeds:
            return "–"
        values = [v for _, v in seeds]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        each = f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.2f}{spread}{each}"

    header = ["batch size", "lr", *[f"<code>{esc(n)}</code>" + (f", {esc(measure_name(m))}" if several[n] else "")
                                    for n, m in columns]]
    body = [[str(size), f"{lrs[size]:g}" if size in lrs else "–", *[cell(n, size, m) for n, m in columns]] for size in sizes]
    seeds = summary.get("seeds") or [summary.get("seed")]
    about = (f"{budget.get('epochs', '?')} epochs of {budget['train_size']:,} {data.DATASETS.get(summary.get('dataset', data.DEFAULT), data.DATASETS[data.DEFAULT]).title} "
             f"training images, tested on {budget.get('test_size', 0):,}" if _is_number(budget.get("train_size")) else "budget not recorded")
    lr = "the learning rate scaled with the batch" if summary.get("lr_scaled", True) else "one learning rate"
    return (f'<h3 id="sweep-{re.sub(r"[^a-z0-9]+", "-", str(path).lower())}"><code>{esc(path)}</code></h3>'
            f"<p>Test error (%) against batch size: {esc(about)}, {lr}, seeds {esc(', '.join(map(str, seeds)))}. "
            "Moving averages: batch norm tested with the statistics it kept while training; precise statistics: "
            "recomputed over the unrotated training images (<code>normtf evaluate --precise-bn</code>) with dropout "
            "off, as at test time, and on, as in training: the first gap is what the averaging costs, the second "
            "what dropout's variance shift costs.</p>"
            f'<div class="sweep">{{plot{plot}}}</div>'
            + table_html(header, body, f' id="sweep-table-{plot}"', left=0)
            + f"<p>Made by:</p><pre>{esc(sweep_command(summary, path))}</pre>")


UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def stable_ids(page: str) -> str:
    """Bokeh names each embedded document and its place in the page with a random UUID; numbered
    in order of appearance instead, the same directory gives the same page, byte for byte, and a
    committed page changes only where its runs did."""
    ids: dict[str, str] = {}
    return UUID.sub(lambda m: ids.setdefault(m.group(0), f"normtf-{len(ids) + 1}"), page)
