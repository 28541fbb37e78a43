"""Does batch norm really fail at small batches? Train each variant at each batch size on the same
budget of images, over several seeds, and compare test error (figure 1 of Wu & He, Group
Normalization, 2018). The budget is epochs, not steps: 2 epochs of 20,000 images (the default) are
20,000 steps at batch 2 and 314 at batch 128, with the learning rate scaled with the batch.

Each run's test error is the one `normtf train` reports, on the final weights. A variant that tests
with moving batch statistics (batch norm's kind, norms.Norm.moving) is measured three ways
(normtf.precise_bn.MEASURES): with its moving averages (that error), and with precise statistics
recomputed over the run's unrotated training images with dropout off, as at test time, and on, as
in training. Moving averages against precise with dropout on is what the averaging costs; precise
with dropout on against off is what dropout's variance shift costs. If batch norm's error at small
batches stays high with both, training on noisy batch statistics was the problem.

The sweep's JSON (results/sweep.json) holds "seeds", the budget, the "recipe" (the dropout, and
every other setting of RECIPE that differs from the reference recipe), the "normtf" that wrote it
(and measured the precise statistics; each row's names the code that trained its run), one row per
(variant, batch size, seed) and a "summary" per (variant, batch size) over its finished seeds: the mean, the sample
standard deviation (None for one seed), the lowest and the highest test error, of each measure the
variant has (a precise one is None for a variant without batch norm, and the dropout-on one None
in a sweep without dropout, where it is the dropout-off pass). Files written before --seeds (a
"seed", rows without one, no summary) are read and drawn as one-seed sweeps; --extend takes a file
without a "recipe" for the reference recipe's.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

from normtf import data
from normtf import figures
from normtf import grid
from normtf.config import TrainConfig
from normtf.console import recipe_words
from normtf.job import Options, RunSpec
from normtf.errors import UsageError
from normtf.evaluation import evaluate_file
from normtf.files import read_json, write_json
from normtf.norms import NORMS, color, get_norm
from normtf.precise_bn import ERROR, MEASURES, PRECISE, PRECISE_DROPOUT_ON
from normtf.runs import RunDir, code_version
from normtf.training import TrainResult, preflight

REFERENCE = TrainConfig()
REFERENCE_BATCH = REFERENCE.batch_size  # the learning rate is the recipe's at this batch size
# The settings every run of a sweep shares, besides the budget, the dataset and the learning rate:
# the JSON records the dropout, and any other of them that differs from the reference recipe.
RECIPE = ("dropout", "schedule", "momentum", "l1", "groups", "rotation")


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
    statistics (dropout off and on), and write the rows, in the variants table's order, and their
    summary to `out`. A run that a sweep made before --seeds left in batch-<size>/<norm>/ itself is
    reused there when it is this finished run (unless `force`). Every run is checked before the first one starts. `extend`, another sweep's
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
    rows.sort(key=lambda r: (r["batch_size"], list(NORMS).index(r["norm"]), seeds.index(r["seed"])))
    summary = {"dataset": base.dataset, "lr_scaled": scale_lr, "reference_batch": REFERENCE_BATCH, "seeds": seeds,
               "recipe": sweep_recipe(base), "budget": budget(), "normtf": code_version(), "rows": rows,
               "summary": summarize(rows)}
    write_json(Path(out), summary)
    return summary


def kept_rows(previous: dict, norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool,
              seeds: list[int], budget: dict) -> list[dict]:
    """The rows of a previous sweep (--extend) of the variants this sweep does not train, so that a sweep
    grows by a variant without retraining the others. Only where both measured the same thing: the
    dataset, the budget, the recipe (sweep_recipe: the dropout...), the batch sizes, the seeds and
    the learning rates; else a UsageError naming each difference, before any run starts. A row of a
    file from before a measure was added gets it as None: not measured."""
    rows = [{"seed": sweep_seeds(previous)[0], **{key: None for key in MEASURES}, **row}
            for row in previous.get("rows", []) if row["norm"] not in norms]
    if not rows:
        raise UsageError("--extend: that sweep has no rows of variants other than this one's "
                         f"({', '.join(dict.fromkeys(norms))}); run the sweep without --extend")
    batch_lr = {(row["batch_size"], row["lr"]) for row in rows}
    ours = {(c.batch_size, c.lr) for c in sweep_configs(norms[:1], batch_sizes, base, scale_lr, [base.seed])}
    recorded = recorded_recipe(previous)
    differences = [f"{name} {theirs} there, {mine} here" for name, theirs, mine in [
        ("dataset", previous.get("dataset", data.DEFAULT), base.dataset),
        ("budget", previous.get("budget"), budget),
        *[(name, getattr(recorded, name), getattr(base, name)) for name in RECIPE],
        ("seeds", sweep_seeds(previous), seeds),
        ("batch sizes and learning rates", sorted(batch_lr), sorted(ours))] if theirs != mine]
    if differences:
        raise UsageError(f"--extend: that sweep measured something else ({'; '.join(differences)}); "
                         "use its flags, or run the sweep without --extend")
    return rows


def sweep_recipe(config: TrainConfig) -> dict:
    """The recipe of a sweep's runs as its JSON records it: the dropout, and every other setting of
    RECIPE in which `config` differs from the reference recipe."""
    return {name: getattr(config, name) for name in RECIPE
            if name == "dropout" or getattr(config, name) != getattr(REFERENCE, name)}


def recorded_recipe(summary: dict) -> TrainConfig:
    """The recipe a sweep's JSON records, as a TrainConfig's settings, for --extend to compare; a
    file from before it was recorded (normtf's sweep could not change the dropout then) is taken as
    the reference recipe's."""
    return REFERENCE.replace(**{name: value for name, value in summary.get("recipe", {}).items() if name in RECIPE})


def _row(result: TrainResult, dataset, warn) -> dict:
    """A run as a row of the sweep. Precise statistics are computed anew each time (about 10 s a
    pass at batch 2 on 20,000 images): they are in no file of the run, and the model may have been
    retrained. A run without dropout has no dropout-on pass: it would be the dropout-off one."""
    config, metrics = result.config, result.metrics
    finished = metrics["status"] == "finished"
    precise = {PRECISE: None, PRECISE_DROPOUT_ON: None}
    if finished and has_batch_norm(config.norm):
        passes = {PRECISE: False, **({PRECISE_DROPOUT_ON: True} if config.dropout > 0 else {})}
        for key, dropout in passes.items():
            evaluation = evaluate_file(result.run.model, dataset(), config.test_size, warn=warn, precise_bn=True,
                                       dropout=dropout)
            precise[key] = 100 * (1 - evaluation.accuracy)
    return {"norm": config.norm, "batch_size": config.batch_size, "seed": config.seed, "lr": config.lr,
            "status": metrics["status"], **({"failure": metrics["failure"]["reason"]} if "failure" in metrics else {}),
            "test_accuracy": metrics["final_test_accuracy"] if finished else None,
            ERROR: 100 * (1 - metrics["final_test_accuracy"]) if finished else None, **precise,
            "mean_epoch_time": metrics.get("mean_epoch_time"),
            "normtf": (read_json(result.run.config) or {}).get("normtf") if finished else None}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (variant, batch size), in the rows' order: the seeds that finished and the statistics of
    their test error by each measure (spread(); None for a measure a variant does not have, or
    where no seed finished)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["norm"], row["batch_size"]), []).append(row)
    points = []
    for (norm, size), group in groups.items():
        done = [r for r in group if r["status"] == "finished"]
        measured = {key: [r.get(key) for r in done] for key in MEASURES}
        points.append({"norm": norm, "batch_size": size, "lr": group[0]["lr"], "seeds": [r.get("seed") for r in done],
                       **{key: spread(values) if None not in values else None for key, values in measured.items()}})
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


STYLES = {ERROR: "-", PRECISE: "--", PRECISE_DROPOUT_ON: ":"}  # each measure's line in the figure


def sweep_lines(summary: dict, measures: tuple[str, ...] = (ERROR,), bands: bool = True) -> dict[str, dict]:
    """The sweep's `measures` as figures.sweep_figure's lines: per variant and measure it has, the
    mean test error of its finished seeds at each batch size and, with several seeds and `bands`,
    the lowest and highest (the band). A line is named by its variant, and by the measure too when
    there are several (MEASURES' words), drawn in the variant's color and the measure's style."""
    points = summarize(summary["rows"])
    several = any(len(p["seeds"]) > 1 for p in points)
    lines = {}
    for point in points:
        for key in measures:
            stats = point.get(key)
            if stats is None:
                continue
            name = point["norm"] if len(measures) == 1 else f"{point['norm']}: {MEASURES[key]}"
            line = lines.setdefault(name, {"label": name, "color": color(point["norm"]), "style": STYLES[key],
                                           "batch_sizes": [], "errors": [], "low": [], "high": []})
            line["batch_sizes"].append(point["batch_size"])
            line["errors"].append(stats["mean"])
            line["low"].append(stats["min"])
            line["high"].append(stats["max"])
    for line in lines.values():
        if not (bands and several):
            line["low"] = line["high"] = None
    return lines


def sweep_panels(summary: dict) -> list[tuple[str, dict[str, dict], str | None]]:
    """The figure's panels, (title, lines, legend title) each: every variant as `normtf train` tests
    it, with the seeds' bands; and, if the sweep measured a batch norm with precise statistics, each
    batch norm three ways (two without dropout, where the dropout-on pass is the dropout-off one),
    without bands, which would hide one another (the first panel has the moving averages')."""
    seeds = sweep_seeds(summary)
    mean = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else None
    panels = [("Every variant, as normtf train tests it (batch norms: moving averages)", sweep_lines(summary),
               f"lines: {mean}; bands: lowest to highest seed" if mean else None)]
    if any(row.get(PRECISE) is not None for row in summary["rows"]):
        moving = [row for row in summary["rows"] if has_batch_norm(row["norm"])]
        panels.append(("Batch norms with moving averages and with precise statistics (recomputed over the training "
                       "images)", sweep_lines({**summary, "rows": moving}, tuple(MEASURES), bands=False),
                       f"lines: {mean}" if mean else None))
    return panels


def budget_steps(summary: dict) -> str:
    """The budget in steps, at the smallest and the largest batch size: "20,000 steps at batch 2 to
    314 at batch 128" (each epoch ends with a partial batch, as training does)."""
    budget, sizes = summary["budget"], sorted({row["batch_size"] for row in summary["rows"]})
    steps = {size: budget["epochs"] * data.steps_per_epoch(budget["train_size"], size) for size in sizes}
    if len(sizes) == 1:
        return f"{steps[sizes[0]]:,} steps at batch {sizes[0]}"
    return f"{steps[sizes[0]]:,} steps at batch {sizes[0]} to {steps[sizes[-1]]:,} at batch {sizes[-1]}"


def sweep_title(summary: dict) -> str:
    budget = summary["budget"]
    row, reference = summary["rows"][0], summary["reference_batch"]
    lr = (f"lr proportional to the batch ({row['lr'] * reference / row['batch_size']:g} at {reference})"
          if summary["lr_scaled"] else f"lr {row['lr']:g} at every batch size")
    title = data.DATASETS[summary.get("dataset", data.DEFAULT)].title
    seeds, recipe = sweep_seeds(summary), recipe_words(summary.get("recipe", {}))
    return (f"Test error vs batch size on {title}: {budget['epochs']} epoch{'s' if budget['epochs'] != 1 else ''} of "
            f"{budget['train_size']:,} images ({budget_steps(summary)}),\n"
            f"{recipe + ', ' if recipe else ''}tested on {budget['test_size']:,}, {lr}, "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")


def draw_sweep(summary: dict, path: Path) -> Path:
    """The sweep's figure (sweep_panels): test error against batch size."""
    return figures.plot_sweep(sweep_panels(summary), path, sweep_title(summary))
