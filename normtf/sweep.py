"""Does batch norm really fail at small batches? Train each variant at each batch size on the same
budget of images, over several seeds, and compare test error (figure 1 of Wu & He, Group
Normalization, 2018). For batch norm the error is measured twice, with the moving averages it was
trained to keep and with precise statistics (normtf.precise_bn): if the two differ at small batches,
the test-time estimate was the problem; if they agree, training on noisy batch statistics was.

The sweep's JSON (results/sweep.json) holds "seeds", the budget, one row per (variant, batch size,
seed) and a "summary" per (variant, batch size) over its finished seeds: the mean, the sample
standard deviation (None for one seed), the lowest and the highest test error, with the moving
averages and, for batch norm, with precise statistics. Files written before --seeds (a "seed", rows
without one, no summary) are read and drawn as one-seed sweeps.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

from normtf import data
from normtf import figures
from normtf import grid
from normtf.job import Options, RunSpec
from normtf.config import TrainConfig
from normtf.errors import UsageError
from normtf.evaluation import evaluate_file
from normtf.files import read_json, write_json
from normtf.norms import color, get_norm
from normtf.runs import RunDir
from normtf.training import TrainResult, preflight

REFERENCE_BATCH = TrainConfig().batch_size  # the learning rate is the recipe's at this batch size
ERROR, PRECISE = "test_error_percent", "test_error_percent_precise_bn"  # with moving averages; with precise statistics


def has_batch_norm(norm: str) -> bool:
    """Whether the variant's test-time network normalizes by moving batch statistics (batch norm,
    and batch renormalization, whose saved model is batch norm's)."""
    return get_norm(norm).moving


def sweep_configs(norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool,
                  seeds: list[int] | None = None) -> list[TrainConfig]:
    """One config per (seed, batch size, variant), a seed's whole sweep before the next seed's (an
    interrupted sweep leaves whole sweeps behind); with scale_lr the learning rate grows linearly with the batch."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive whole numbers (got {batch_sizes})")
    return [base.replace(norm=norm, batch_size=size, seed=seed, lr=base.lr * size / REFERENCE_BATCH if scale_lr else base.lr)
            for seed in seeds or [base.seed] for size in sorted(set(batch_sizes)) for norm in dict.fromkeys(norms)]


def run_sweep(norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool, runs_dir: Path,
              out: Path, seeds: list[int] | None = None, callbacks_for=lambda config: (), force: bool = False,
              data_dir: Path | None = None, warn=lambda message: None, jobs: int | None = 1,
              cluster: str | None = None, show: bool = False, extend: dict | None = None) -> dict:
    """Train (or reuse) every config under runs_dir/batch-<size>/<norm>/seed-<s>/, `jobs` at a time
    or on a Ray cluster (normtf.grid), measure every finished batch-norm run again with precise
    statistics, and write the rows and their summary to `out`. A run that a sweep made before
    --seeds left in batch-<size>/<norm>/ itself is reused there when it is this finished run
    (unless `force`). Every run is checked before the first one starts. `extend`, another sweep's
    summary, keeps its rows of the variants this one does not train (kept_rows)."""
    seeds = seeds or [base.seed]
    planned = []
    for config in sweep_configs(norms, batch_sizes, base, scale_lr, seeds):
        directory = Path(runs_dir) / f"batch-{config.batch_size}"
        per_seed = force or RunDir.for_config(directory, config).status(config) != "finished"
        planned.append(RunSpec(preflight(config, directory, per_seed, force), directory, per_seed,
                                f"{config.norm} at batch size {config.batch_size}, seed {config.seed}"))
    options = Options(force=force, data_dir=data_dir)
    images = data.loader(data_dir, warn)  # one load for the runs trained here and the precise statistics
    dataset = functools.partial(images, base.dataset)
    budget = lambda: {"epochs": base.epochs, "train_size": base.train_size or len(dataset().y_train),  # noqa: E731
                      "test_size": base.test_size or len(dataset().y_test)}
    kept = kept_rows(extend, norms, batch_sizes, base, scale_lr, seeds, budget()) if extend else []
    results = grid.run(planned, jobs, cluster, options, callbacks_for, show, warn, dataset=images)
    rows = kept + [_row(result, dataset, warn) for result in results]
    order = list(dict.fromkeys([row["norm"] for row in kept] + norms))
    rows.sort(key=lambda r: (r["batch_size"], order.index(r["norm"]), seeds.index(r["seed"])))
    summary = {"dataset": base.dataset, "lr_scaled": scale_lr, "reference_batch": REFERENCE_BATCH, "seeds": seeds,
               "budget": budget(), "rows": rows, "summary": summarize(rows)}
    write_json(Path(out), summary)
    return summary


def kept_rows(previous: dict, norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool,
              seeds: list[int], budget: dict) -> list[dict]:
    """The rows of a previous sweep (--extend) of the variants this sweep does not train, so that a sweep
    grows by a variant without retraining the others. Only where both measured the same thing: the
    dataset, the budget, the batch sizes, the seeds and the learning rates; else a UsageError naming
    each difference, before any run starts."""
    rows = [{"seed": sweep_seeds(previous)[0], **row} for row in previous.get("rows", []) if row["norm"] not in norms]
    if not rows:
        raise UsageError("--extend: that sweep has no rows of variants other than this one's "
                         f"({', '.join(dict.fromkeys(norms))}); run the sweep without --extend")
    batch_lr = {(row["batch_size"], row["lr"]) for row in rows}
    ours = {(c.batch_size, c.lr) for c in sweep_configs(norms[:1], batch_sizes, base, scale_lr, [base.seed])}
    differences = [f"{name} {theirs} there, {mine} here" for name, theirs, mine in [
        ("dataset", previous.get("dataset", data.DEFAULT), base.dataset),
        ("budget", previous.get("budget"), budget),
        ("seeds", sweep_seeds(previous), seeds),
        ("batch sizes and learning rates", sorted(batch_lr), sorted(ours))] if theirs != mine]
    if differences:
        raise UsageError(f"--extend: that sweep measured something else ({'; '.join(differences)}); "
                         "use its flags, or run the sweep without --extend")
    return rows


def _row(result: TrainResult, dataset, warn) -> dict:
    """A run as a row of the sweep. Precise statistics are computed anew each time (about 10 s at
    batch 2 on 20,000 images): they are in no file of the run, and the model may have been retrained."""
    config, metrics = result.config, result.metrics
    finished = metrics["status"] == "finished"
    precise = None
    if finished and has_batch_norm(config.norm):
        evaluation = evaluate_file(result.run.model, dataset(), config.test_size, warn=warn, precise_bn=True)
        precise = 100 * (1 - evaluation.accuracy)
    return {"norm": config.norm, "batch_size": config.batch_size, "seed": config.seed, "lr": config.lr,
            "status": metrics["status"], **({"failure": metrics["failure"]["reason"]} if "failure" in metrics else {}),
            "test_accuracy": metrics["final_test_accuracy"] if finished else None,
            ERROR: 100 * (1 - metrics["final_test_accuracy"]) if finished else None, PRECISE: precise,
            "mean_epoch_time": metrics.get("mean_epoch_time"),
            "normtf": (read_json(result.run.config) or {}).get("normtf") if finished else None}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (variant, batch size), in the rows' order: the seeds that finished and the statistics of
    their test error (spread(); None for the precise one of a variant without batch norm, or where no seed finished)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["norm"], row["batch_size"]), []).append(row)
    points = []
    for (norm, size), group in groups.items():
        done = [r for r in group if r["status"] == "finished"]
        precise = [r.get(PRECISE) for r in done]
        points.append({"norm": norm, "batch_size": size, "lr": group[0]["lr"], "seeds": [r.get("seed") for r in done],
                       ERROR: spread([r[ERROR] for r in done]),
                       PRECISE: spread(precise) if None not in precise else None})
    return points


def spread(values: list[float]) -> dict | None:
    """Mean, sample standard deviation (None for one value), lowest and highest; None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def sweep_seeds(summary: dict) -> list[int]:
    """The sweep's seeds; a file from before --seeds has one, "seed"."""
    return summary["seeds"] if "seeds" in summary else [summary["seed"]]


def sweep_lines(summary: dict) -> dict[str, dict]:
    """The sweep as figures.sweep_figure's lines: per variant the mean test error of its finished
    seeds at each batch size and, with several seeds, the lowest and highest (the band); for a
    batch-norm variant measured with precise statistics, a dashed line of their mean beside it."""
    points = summarize(summary["rows"])
    several = any(len(p["seeds"]) > 1 for p in points)
    lines = {}
    for point in points:
        for key, name, dashed in [(ERROR, point["norm"], False), (PRECISE, f"{point['norm']} (precise statistics)", True)]:
            stats = point.get(key)
            if stats is None:
                continue
            line = lines.setdefault(name, {"label": name, "color": color(point["norm"]), "dashed": dashed,
                                           "batch_sizes": [], "errors": [], "low": [], "high": []})
            line["batch_sizes"].append(point["batch_size"])
            line["errors"].append(stats["mean"])
            line["low"].append(stats["min"])
            line["high"].append(stats["max"])
    for name, line in lines.items():
        if line["dashed"] or not several:  # a band for each variant; the precise line is read against it
            line["low"] = line["high"] = None
        if f"{name} (precise statistics)" in lines:
            line["label"] = f"{name} (moving averages)"
    return lines


def sweep_title(summary: dict) -> str:
    budget = summary["budget"]
    row, reference = summary["rows"][0], summary["reference_batch"]
    lr = (f"lr proportional to the batch ({row['lr'] * reference / row['batch_size']:g} at {reference})"
          if summary["lr_scaled"] else f"lr {row['lr']:g} at every batch size")
    title = data.DATASETS[summary.get("dataset", data.DEFAULT)].title
    seeds = sweep_seeds(summary)
    return (f"Test error vs batch size on {title}: {budget['epochs']} epoch{'s' if budget['epochs'] != 1 else ''} of {budget['train_size']:,} images,\n"
            f"tested on {budget['test_size']:,}, {lr}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")


def sweep_legend_title(summary: dict) -> str | None:
    """What the lines and bands are, when there is more than one seed."""
    seeds = sweep_seeds(summary)
    return f"lines: mean of {len(seeds)} seeds; bands: lowest to highest seed" if len(seeds) > 1 else None


def draw_sweep(summary: dict, path: Path) -> Path:
    """The sweep's figure: test error against batch size, one line (and band) per variant."""
    return figures.plot_sweep(sweep_lines(summary), path, sweep_title(summary), sweep_legend_title(summary))
