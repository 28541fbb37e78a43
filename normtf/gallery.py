"""A run's misclassified test images as one figure: `normtf gallery`, `compare`'s galleries, and each
job of a grid right after it trains a run (so that the figures are drawn while other runs train)."""

from __future__ import annotations

from pathlib import Path

from normtf import data, figures
from normtf.evaluation import evaluate_file


def gallery_path(img_dir: Path | str, norm: str) -> Path:
    return Path(img_dir) / f"misclassified_{norm}.png"


def draw_gallery(result, dataset: data.Images, path: Path, count: int = 10) -> Path:
    """The first `count` misclassified test images of a finished run (at most
    figures.MAX_GALLERY_IMAGES), in test-set order, titled with truth, prediction and confidence."""
    evaluation = evaluate_file(result.run.model, dataset, result.config.test_size)
    wrong = evaluation.misclassified(min(count, figures.MAX_GALLERY_IMAGES))
    c, total = result.config, evaluation.total - evaluation.correct
    shown = f"all {total:,}" if len(wrong) == total else f"first {len(wrong):,} of its {total:,}"
    return figures.plot_misclassified(
        evaluation.images[wrong], evaluation.labels[wrong], evaluation.predictions[wrong],
        evaluation.probabilities[wrong].max(axis=1), Path(path),
        f"{c.norm}, seed {c.seed}: test accuracy {100 * evaluation.accuracy:.2f}%\n"
        f"{shown} misclassified {dataset.spec.title} test images", dataset.spec.classes)
