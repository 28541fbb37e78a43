"""Does batch norm really fail at small batches? Train each variant at each batch size on the same
budget of images and compare test error (figure 1 of Wu & He, Group Normalization, 2018)."""

from __future__ import annotations

from pathlib import Path

import functools

from normtf import data
from normtf import figures
from normtf.config import TrainConfig
from normtf.errors import UsageError
from normtf.files import write_json
from normtf.norms import color
from normtf.training import preflight, train

REFERENCE_BATCH = TrainConfig().batch_size  # the learning rate is the recipe's at this batch size


def sweep_configs(norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool) -> list[TrainConfig]:
    """One config per (batch size, variant); with scale_lr the learning rate grows linearly with the batch."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive whole numbers (got {batch_sizes})")
    return [base.replace(norm=norm, batch_size=size, lr=base.lr * size / REFERENCE_BATCH if scale_lr else base.lr)
            for size in sorted(set(batch_sizes)) for norm in norms]


def run_sweep(norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool, runs_dir: Path,
              out: Path, callbacks_for=lambda config: (), force: bool = False, data_dir: Path | None = None,
              warn=lambda message: None) -> dict:
    """Train (or reuse) every config under runs_dir/batch-<size>/<norm>/ and write the table to `out`."""
    configs = [preflight(c, Path(runs_dir) / f"batch-{c.batch_size}", force=force)
               for c in sweep_configs(norms, batch_sizes, base, scale_lr)]
    dataset = functools.cache(lambda: data.load(base.dataset, data_dir, warn=warn))
    rows = []
    for config in configs:
        result = train(config, Path(runs_dir) / f"batch-{config.batch_size}", dataset=dataset,
                       callbacks=callbacks_for(config), force=force, warn=warn)
        finished = result.metrics["status"] == "finished"
        rows.append({"norm": config.norm, "batch_size": config.batch_size, "lr": config.lr,
                     "status": result.metrics["status"],
                     "test_accuracy": result.metrics["final_test_accuracy"] if finished else None,
                     "test_error_percent": 100 * (1 - result.metrics["final_test_accuracy"]) if finished else None,
                     "mean_epoch_time": result.metrics.get("mean_epoch_time")})
    summary = {"dataset": base.dataset, "lr_scaled": scale_lr, "reference_batch": REFERENCE_BATCH, "seed": base.seed, "rows": rows,
               "budget": {"epochs": base.epochs, "train_size": base.train_size or len(dataset().y_train),
                          "test_size": base.test_size or len(dataset().y_test)}}
    write_json(Path(out), summary)
    return summary


def sweep_lines(summary: dict) -> dict[str, dict]:
    """The finished rows of a sweep as figures.sweep_figure's lines, one per variant."""
    lines = {}
    for row in summary["rows"]:
        if row["status"] != "finished":
            continue
        line = lines.setdefault(row["norm"], {"label": row["norm"], "color": color(row["norm"]),
                                              "batch_sizes": [], "errors": []})
        line["batch_sizes"].append(row["batch_size"])
        line["errors"].append(row["test_error_percent"])
    return lines


def sweep_title(summary: dict) -> str:
    budget = summary["budget"]
    row, reference = summary["rows"][0], summary["reference_batch"]
    lr = (f"lr proportional to the batch ({row['lr'] * reference / row['batch_size']:g} at {reference})"
          if summary["lr_scaled"] else f"lr {row['lr']:g} at every batch size")
    title = data.DATASETS[summary.get("dataset", data.DEFAULT)].title
    return (f"Test error vs batch size on {title}: {budget['epochs']} epochs of {budget['train_size']:,} images,\n"
            f"tested on {budget['test_size']:,}, {lr}, seed {summary['seed']}")


def draw_sweep(summary: dict, path: Path) -> Path:
    """The sweep's figure: test error against batch size, one line per variant."""
    return figures.plot_sweep(sweep_lines(summary), path, sweep_title(summary))
