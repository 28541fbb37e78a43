"""What the terminal shows after the work: warnings and the tables (rich). Live progress during
training is normtf.progress (a Keras callback); this module does not load Keras, so a command
can report a bad value before TensorFlow starts."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def results_table(groups: dict[str, list], title: str = "Results") -> Table:
    """One row per variant (`groups`: its runs, one per seed): params, final and best test accuracy
    (mean ± std over seeds), final test loss, time per epoch."""
    table = Table(title=title)
    for column in ["variant", "params", "seeds", "final test acc", "best test acc (epoch)", "final test loss",
                   "s / epoch", "status"]:
        table.add_column(column, justify="left" if column in ("variant", "status") else "right")
    for norm, group in groups.items():
        done = [r.metrics for r in group if r.metrics.get("status") == "finished"]
        failed = [r.metrics["failure"] for r in group if r.metrics.get("status") == "failed"]
        status = "reused" if all(r.reused for r in group) else "trained"
        if failed:
            status = "; ".join(f"[red]failed[/] (non-finite loss, epoch {f['epoch']} step {f['step']})" for f in failed)
        seeds = ", ".join(str(r.config.seed) for r in group)
        if not done:
            table.add_row(norm, f"{group[0].metrics.get('trainable_params', 0):,}", seeds, "-", "-", "-", "-", status)
            continue
        epochs = ", ".join(str(m["best_epoch"]) for m in done)
        table.add_row(norm, f"{done[0]['trainable_params']:,}", seeds,
                      _spread([m["final_test_accuracy"] for m in done], percent=True),
                      f"{_spread([m['best_test_accuracy'] for m in done], percent=True)} ({epochs})",
                      _spread([m["final_test_loss"] for m in done]),
                      f"{sum(m['mean_epoch_time'] for m in done) / len(done):.1f}", status)
    return table


def _spread(values: list[float], percent: bool = False) -> str:
    """One value as it is; several as mean ± sample standard deviation."""
    scale, unit, digits = (100, "%", 2) if percent else (1, "", 4)
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}{unit}"


def sweep_table(summary: dict) -> Table:
    """Test error (%) with batch sizes down and variants across."""
    norms = list(dict.fromkeys(row["norm"] for row in summary["rows"]))
    epochs = summary["budget"]["epochs"]
    table = Table(title=f"Test error (%) after {epochs} epoch{'s' if epochs != 1 else ''} of "
                        f"{summary['budget']['train_size']:,} images")
    table.add_column("batch size", justify="right")
    for norm in norms:
        table.add_column(norm, justify="right")
    errors = {(row["norm"], row["batch_size"]): row for row in summary["rows"]}
    for size in sorted({row["batch_size"] for row in summary["rows"]}):
        cells = [errors.get((norm, size)) for norm in norms]
        table.add_row(str(size), *["-" if c is None else "failed" if c["status"] != "finished"
                                   else f"{c['test_error_percent']:.2f}" for c in cells])
    return table


def confusion_table(evaluation) -> Table:
    """Rows: true class, columns: predicted (numbered; the rows name classes that are not digits)."""
    table = Table(title="confusion matrix (rows: true class, columns: predicted)")
    table.add_column("true", justify="right")
    for k in range(len(evaluation.classes)):
        table.add_column(str(k), justify="right")
    for k, row in enumerate(evaluation.confusion_matrix()):
        name = evaluation.classes[k]
        table.add_row(name if name == str(k) else f"{name} {k}", *[
            f"[bold]{v}[/]" if i == k else (str(v) if v else "·") for i, v in enumerate(row)])
    return table


def explain_table(norm: str, batch_size: int, reports) -> Table:
    table = Table(title=f"{norm}: a batch of {batch_size} test images through a freshly built model")
    for column in ["layer", "input (N,H,W,C)", "normalizes over", "means = variances", "trainable",
                   "non-trainable", "differs at test time"]:
        table.add_column(column)
    for r in reports:
        table.add_row(r.layer, "×".join(map(str, r.input_shape)), r.reduces_over, str(r.statistics),
                      f"{r.trainable:,}", f"{r.non_trainable:,}",
                      f"yes: moving statistics (max |Δ| {r.test_time_max_change:.2f})"
                      if r.test_time_differs else "no")
    return table
