"""The comparison itself: train several variants under one recipe, then draw what they did."""

from __future__ import annotations

from pathlib import Path

from normtf import data as mnist
from normtf import figures
from normtf.config import NormtfError, TrainConfig
from normtf.evaluation import evaluate_file
from normtf.norms import NORMS, get_norm
from normtf.runs import CorruptFile, RunDir
from normtf.training import TrainResult, train


def compare(norms: list[str], config: TrainConfig, runs_dir: Path, callbacks_for=lambda norm: (),
            force: bool = False, data_dir: Path | None = None, warn=lambda message: None) -> list[TrainResult]:
    """Train each variant in turn (reusing finished runs with the same settings)."""
    dataset = None
    results = []
    for norm in norms:
        run_config = config.replace(norm=norm)
        if RunDir(Path(runs_dir) / norm).status(run_config) != "finished" or force:
            dataset = dataset or mnist.load_mnist(data_dir, warn=warn)
        results.append(train(run_config, runs_dir, dataset=dataset, callbacks=callbacks_for(norm),
                             force=force, warn=warn))
    return results


def color(norm: str) -> str:
    """The same color for a variant in every figure: its place in the table of norms."""
    return f"C{list(NORMS).index(norm)}"


def load_result(run: RunDir) -> TrainResult | None:
    """A finished or failed run as stored, or None if there is nothing usable (reported by status)."""
    try:
        config, metrics = run.stored_config(), run.read_metrics()
        if config is None or metrics is None:
            return None
        return TrainResult(run, config, run.read_history(), metrics, reused=True)
    except CorruptFile:
        return None


def draw_curves(results: list[TrainResult], path: Path) -> Path | None:
    finished = [r for r in results if r.metrics.get("status") == "finished"]
    if not finished:
        return None
    c = finished[0].config
    size = f"{c.train_size:,}" if c.train_size else "60,000"
    title = (f"MNIST, {size} training images, batch {c.batch_size}, SGD lr {c.lr} momentum {c.momentum}, "
             f"seed {c.seed}  (normtf)")
    runs = {r.config.norm: {"label": f"{get_norm(r.config.norm).label} ({r.metrics['trainable_params']:,} params)",
                            "color": color(r.config.norm), "history": r.history} for r in finished}
    return figures.plot_curves(runs, path, title)


def gallery(results: list[TrainResult], img_dir: Path, count: int = 10, data_dir: Path | None = None,
            warn=lambda message: None) -> list[Path]:
    """For each finished run, the first `count` misclassified test images as a grid."""
    finished = [r for r in results if r.metrics.get("status") == "finished"]
    if not finished:
        return []
    dataset = mnist.load_mnist(data_dir, warn=warn)
    paths = []
    for result in finished:
        evaluation = evaluate_file(result.run.model, dataset, result.config.test_size, result.config.seed)
        wrong = evaluation.misclassified(count)
        label = get_norm(result.config.norm).label
        paths.append(figures.plot_misclassified(
            evaluation.images[wrong], evaluation.labels[wrong], evaluation.predictions[wrong],
            evaluation.probabilities[wrong].max(axis=1), Path(img_dir) / f"misclassified_{label}.png",
            f"{label}: first {len(wrong)} of {evaluation.total - evaluation.correct} misclassified test images "
            f"(test accuracy {100 * evaluation.accuracy:.2f}%)"))
    return paths


def stored_results(norms: list[str], runs_dir: Path) -> list[TrainResult]:
    results = [load_result(RunDir(Path(runs_dir) / norm)) for norm in norms]
    found = [r for r in results if r is not None]
    if not found:
        raise NormtfError(f"no trained run in {runs_dir} for {', '.join(norms)}; "
                          "train first: normtf compare --all (or normtf train --norm <norm>)")
    return found


def draw_sweep(summary: dict, path: Path) -> Path:
    lines = {}
    for row in summary["rows"]:
        if row["status"] != "finished":
            continue
        line = lines.setdefault(row["norm"], {"label": get_norm(row["norm"]).label, "color": color(row["norm"]),
                                              "batch_sizes": [], "errors": []})
        line["batch_sizes"].append(row["batch_size"])
        line["errors"].append(row["test_error_percent"])
    budget = summary["budget"]
    lr = (f"lr scaled linearly from batch {summary['reference_batch']}" if summary["lr_scaled"]
          else "same lr at every batch size")
    title = f"Test error vs batch size: {budget['epochs']} epochs of {budget['train_size']:,} MNIST images, {lr}"
    return figures.plot_sweep(lines, path, title)
