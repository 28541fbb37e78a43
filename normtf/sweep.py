"""Does batch norm really fail at small batches? Train each variant at each batch size on the same
budget of images and compare test error (figure 1 of Wu & He, Group Normalization, 2018)."""

from __future__ import annotations

from pathlib import Path

from normtf import data as mnist
from normtf.config import TrainConfig, UsageError
from normtf.runs import write_json
from normtf.training import TrainResult, train

SWEEP_DEFAULTS = dict(epochs=2, train_size=20_000)
REFERENCE_BATCH = TrainConfig().batch_size  # the learning rate is the recipe's at this batch size


def sweep_configs(norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool) -> list[TrainConfig]:
    """One config per (batch size, variant); with scale_lr the learning rate grows linearly with the batch."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive whole numbers (got {batch_sizes})")
    return [base.replace(norm=norm, batch_size=size, lr=base.lr * size / REFERENCE_BATCH if scale_lr else base.lr)
            for size in sorted(set(batch_sizes)) for norm in norms]


def run_sweep(norms: list[str], batch_sizes: list[int], base: TrainConfig, scale_lr: bool, runs_dir: Path,
              out: Path, callbacks_for=lambda config: (), data_dir: Path | None = None,
              warn=lambda message: None) -> dict:
    """Train (or reuse) every config under runs_dir/batch-<size>/<norm>/ and write the table to `out`."""
    configs = sweep_configs(norms, batch_sizes, base, scale_lr)
    dataset = mnist.load_mnist(data_dir, warn=warn)
    rows = []
    for config in configs:
        config.validate()
        result: TrainResult = train(config, Path(runs_dir) / f"batch-{config.batch_size}", dataset=dataset,
                                    callbacks=callbacks_for(config), warn=warn)
        finished = result.metrics["status"] == "finished"
        rows.append({"norm": config.norm, "batch_size": config.batch_size, "lr": config.lr,
                     "status": result.metrics["status"],
                     "test_accuracy": result.metrics["final_test_accuracy"] if finished else None,
                     "test_error_percent": 100 * (1 - result.metrics["final_test_accuracy"]) if finished else None,
                     "mean_epoch_time": result.metrics.get("mean_epoch_time")})
    summary = {"lr_scaled": scale_lr, "budget": {"epochs": base.epochs, "train_size": base.train_size or len(dataset.y_train),
                          "test_size": base.test_size or len(dataset.y_test)},
               "reference_batch": REFERENCE_BATCH, "seed": base.seed, "rows": rows}
    write_json(Path(out), summary)
    return summary
