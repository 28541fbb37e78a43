"""What the terminal shows after the work: warnings and the tables (rich). Live progress during
training is normtf.progress (a Keras callback); this module does not load Keras, so a command
can report a bad value before TensorFlow starts.

Output that is not a terminal (a file, a pipe, a job scheduler's log) is a log a person greps:
lines are never broken at rich's default 80 columns (soft wrap: a run's path or an epoch line
stays whole), and nothing live is drawn there (live_display()); tables keep their 80-column layout."""

from __future__ import annotations

import statistics

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)
for _console in (console, err_console):  # decided once, for the streams the process starts with
    _console.soft_wrap = not _console.is_terminal


def live_display() -> bool:
    """Whether progress bars and other live displays are drawn: on a terminal only. Redrawn in
    place they mean something to a person watching; in a log they are noise (or nothing at all),
    so there only whole lines are printed."""
    return console.is_terminal


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


# Tables that fit an 80-column terminal: no vertical rules and one space between columns; each
# table keeps its names and numbers from wrapping (no_wrap, min_width) and breaks lines itself.
COMPACT = dict(box=box.SIMPLE_HEAD, padding=0, show_edge=False)


def results_table(groups: dict[str, list], title: str = "Results") -> Table:
    """One row per variant (`groups`: its runs, one per seed): params, final and best test accuracy
    (mean ± std over seeds), final test loss, time per epoch; of runs measured on a validation
    split (--validation), those of the split, and the columns say so. The caption says what "best" is."""
    split = "validation" if all(r.config.evaluated_on == "validation" for g in groups.values() for r in g) else "test"
    word = {"test": "test", "validation": "val"}[split]
    table = Table(title=title, caption=f"best: each run's highest {split} accuracy over its epochs, picked on the "
                                       f"{split} set" + (" (optimistic by construction)" if split == "test" else "")
                                       + ", and the epoch", **COMPACT)
    for column in ["variant", "params", "seeds", f"final {word}\nacc", f"best {word} acc\n(epoch)",
                   f"final {word}\nloss", "s /\nepoch", "status"]:
        table.add_column(column, justify="left" if column in ("variant", "status") else "right",
                         no_wrap=column != "status",  # only the status wraps: the 80 columns go to it
                         min_width={"final": 13, "best ": 13, "status": 7}.get(column[:5]) if "acc" in column
                         or column == "status" else None)
    for norm, group in groups.items():
        done = [r.metrics for r in group if r.metrics.get("status") == "finished"]
        failed = [r.metrics["failure"] for r in group if r.metrics.get("status") == "failed"]
        status = "reused" if all(r.reused for r in group) else "trained"
        if failed:
            status = "; ".join("[red]failed[/]: " + (f"loss not finite at epoch {f['epoch']}, step {f['step']}"
                                                      if "step" in f else escape(f.get("short", f["reason"])))
                               for f in failed)
        elif any(r.metrics.get("status") == "busy" for r in group):
            status = "busy: another normtf process is training it"
        seeds = _seeds([r.config.seed for r in group])
        if not done:
            params = group[0].metrics.get("trainable_params")
            table.add_row(norm, "-" if params is None else f"{params:,}", seeds, "-", "-", "-", "-", status)
            continue
        epochs = ", ".join(str(m["best_epoch"]) for m in done)
        table.add_row(norm, f"{done[0]['trainable_params']:,}", seeds,
                      _spread([m[f"final_{split}_accuracy"] for m in done], percent=True),
                      f"{_spread([m[f'best_{split}_accuracy'] for m in done], percent=True)}"
                      + (f" ({epochs})" if len(done) == 1 else f"\n({epochs})"),
                      _spread([m[f"final_{split}_loss"] for m in done]).replace(" ± ", "\n± "),
                      f"{sum(m['mean_epoch_time'] for m in done) / len(done):.1f}", status)
    return table


def _seeds(seeds: list[int]) -> str:
    """42, 43, 44 as "42–44"; seeds that are not a run of consecutive numbers as a list."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _spread(values: list[float], percent: bool = False) -> str:
    """One value as it is; several as mean ± sample standard deviation."""
    scale, unit, digits = (100, "%", 2) if percent else (1, "", 4)
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}{unit}"


def recipe_words(recipe: dict) -> str:
    """A sweep's recorded recipe (normtf.sweep.sweep_recipe) in a title: "dropout 0.1", "dropout 0, groups 1"."""
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}" for name, value in recipe.items())


def sweep_table(summary: dict, most: int = 4) -> Group:
    """Test error (%) with batch sizes down and variants across (normtf.sweep's JSON). A cell is the
    mean ± sample std over the seeds, and under it each seed's error, in the seeds' order; a
    batch-norm variant measured with precise statistics has a column for each measure it has
    (normtf.precise_bn.MEASURES). At most `most` columns a table (four fit 80 characters); more
    variants continue in a table under it."""
    from normtf.precise_bn import ERROR, MEASURES, PRECISE, PRECISE_DROPOUT_ON

    points = summary["summary"]
    chunks: list[list[tuple[str, str]]] = []
    for norm in dict.fromkeys(p["norm"] for p in points):
        columns = [(norm, key) for key in MEASURES if key == ERROR or any(p.get(key) for p in points if p["norm"] == norm)]
        if chunks and len(chunks[-1]) + len(columns) <= most:
            chunks[-1] += columns
        else:
            chunks.append(columns)
    seeds = summary["seeds"]
    notes = []
    if len(seeds) > 1:
        notes.append("mean ± sample std over the seeds; under it, each seed's error in order")
    shown = {key for chunk in chunks for _, key in chunk}
    ways = [words for key, words in [(PRECISE_DROPOUT_ON, "on (as in training)"), (PRECISE, "off (as at test time)")]
            if key in shown]
    if ways:
        notes.append(f"precise: batch-norm statistics recomputed over the unrotated training images, with dropout "
                     f"{' or '.join(ways)}")
    epochs = summary["budget"]["epochs"]
    recipe = recipe_words(summary.get("recipe", {}))
    title = (f"Test error (%) after {epochs} epoch{'s' if epochs != 1 else ''} of {summary['budget']['train_size']:,} "
             f"images, {recipe + ', ' if recipe else ''}seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    tables = [_sweep_columns(summary, chunk, title if i == 0 else None,
                             "; ".join(notes) or None if i == len(chunks) - 1 else None) for i, chunk in enumerate(chunks)]
    return Group(*[part for table in tables for part in ("", table)][1:])  # a blank line between tables


def _sweep_columns(summary: dict, columns: list[tuple[str, str]], title: str | None, caption: str | None) -> Table:
    """One table of sweep_table: the batch sizes and these (variant, measure) columns; a variant with
    several measures names each under its name."""
    from normtf.precise_bn import MEASURES

    points = {(p["norm"], p["batch_size"]): p for p in summary["summary"]}
    seeds = summary["seeds"]
    several = {norm for norm, _ in columns if sum(n == norm for n, _ in columns) > 1}
    table = Table(title=title, caption=caption, **{**COMPACT, "padding": (0, 0, 0, 2)}, show_lines=len(seeds) > 1)
    table.add_column("batch\nsize", justify="right")
    for norm, key in columns:
        table.add_column(f"{norm}\n{MEASURES[key].replace(', ', chr(10))}" if norm in several else norm,
                         justify="right", no_wrap=True)
    rows = {(r["norm"], r["batch_size"], r["seed"]): r for r in summary["rows"]}
    for size in sorted({p["batch_size"] for p in summary["summary"]}):
        cells = []
        for norm, key in columns:
            point = points.get((norm, size))
            runs = [rows.get((norm, size, seed)) for seed in seeds]
            each = " ".join("-" if r is None else r["status"] if r["status"] != "finished" else
                            "-" if r.get(key) is None else f"{r[key]:.2f}" for r in runs)
            stats = point and point.get(key)
            if not stats:
                cells.append("-" if point is None else each)
                continue
            mean = f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")
            cells.append(mean + (f"\n[dim]{each}[/]" if len(seeds) > 1 else ""))
        table.add_row(str(size), *cells)
    return table


def confusion_table(evaluation, model: str | None = None) -> Table:
    """Rows: true class, columns: predicted (numbered; the rows name classes that are not digits);
    `model` says which of a run's models it is, when more than one is shown."""
    table = Table(title="confusion matrix" + (f" {model}" if model else "") + " (rows: true class, columns: predicted)")
    table.add_column("true", justify="right")
    for k in range(len(evaluation.classes)):
        table.add_column(str(k), justify="right")
    for k, row in enumerate(evaluation.confusion_matrix()):
        name = evaluation.classes[k]
        table.add_row(name if name == str(k) else f"{name} {k}", *[
            f"[bold]{v}[/]" if i == k else (str(v) if v else "·") for i, v in enumerate(row)])
    return table


def explain_table(norm: str, batch_size: int, reports, dataset: str = "MNIST") -> Table:
    table = Table(title=f"{norm}: a batch of {batch_size} {dataset} test images through a freshly built model")
    for column in ["layer", "input (N,H,W,C)", "normalizes over", "means = variances", "trainable",
                   "non-trainable", "differs at test time"]:
        table.add_column(column)
    for r in reports:
        table.add_row(r.layer, "×".join(map(str, r.input_shape)), r.reduces_over, str(r.statistics),
                      f"{r.trainable:,}", f"{r.non_trainable:,}",
                      f"yes: moving statistics (max |Δ| {r.test_time_max_change:.2f})"
                      if r.test_time_differs else "no")
    notes = [note for r in reports for note in r.notes]
    if notes:
        table.caption, table.caption_justify = "\n".join(notes), "left"
    return table


def tuning_table(summary: dict) -> Table:
    """normtf tune's result (normtf.tune.summarize): per variant its trials, how many diverged, and the
    best trial's validation accuracy and recipe."""
    fixed = summary["settings"]["fixed"]
    table = Table(title=f"Best recipe per variant, on {fixed['validation']:,} validation images", **COMPACT)
    for column in ["variant", "trials", "diverged", "best val\nacc", "trial", "lr", "schedule", "dropout", "L1"]:
        table.add_column(column, justify="left" if column in ("variant", "schedule") else "right", no_wrap=True)
    for norm, variant in summary["variants"].items():
        rows, best = variant["trials"], variant["best"]
        told = sum(1 for row in rows if row["state"] in ("finished", "diverged"))
        diverged = sum(1 for row in rows if row["state"] == "diverged")
        if best is None:
            table.add_row(norm, f"{told}", f"{diverged}", "-", "-", "-", "-", "-", "-")
            continue
        params = best["params"]
        table.add_row(norm, f"{told}", f"{diverged}", percent(best["validation_accuracy"]), str(best["number"]),
                      f"{params['lr']:.3g}", params["schedule"], f"{params['dropout']:.3f}",
                      f"{params['l1']:.2g}" if "l1" in params else "-")
    return table
