"""The committed results behind the README: the models re-evaluate to their metrics, and every
normtf number in the README's results table is the one in the committed files."""

import json
import re
from pathlib import Path

import pytest

from normtf.evaluation import evaluate_file
from normtf.runs import RunDir

ROOT = Path(__file__).parent.parent
REFERENCE = ROOT / "results" / "reference"
RUNS = sorted(p.name for p in REFERENCE.iterdir()) if REFERENCE.is_dir() else []


def readme_rows():
    """{variant: cells} of the README results table's normtf rows."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1] == "normtf":
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_committed_run_is_in_the_readme_table():
    assert RUNS and sorted(readme_rows()) == RUNS


@pytest.mark.parametrize("norm", RUNS)
def test_readme_numbers_are_the_committed_ones(norm):
    run = RunDir(REFERENCE / norm)
    history, metrics = run.read_history(), run.read_metrics()
    _, _, params, first, tenth, last, best, loss = readme_rows()[norm]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    assert params == f"{metrics['trainable_params']:,}"
    assert [first, tenth, last] == [pct(history[e - 1]["test_accuracy"]) for e in (1, 10, 20)]
    best_epochs = [r["epoch"] for r in history if r["test_accuracy"] == metrics["best_test_accuracy"]]
    assert best == f"{pct(metrics['best_test_accuracy'])} ({', '.join(map(str, best_epochs))})"
    assert loss == f"{metrics['final_test_loss']:.4f}"


@pytest.mark.parametrize("norm", RUNS)
def test_committed_model_re_evaluates_to_its_metrics(norm, dataset):
    run = RunDir(REFERENCE / norm)
    metrics = run.read_metrics()
    config = json.loads(run.config.read_text())
    assert config["config"]["epochs"] == 20 and config["train_images"] == 60000 and config["test_images"] == 10000
    evaluation = evaluate_file(run.model, dataset)
    assert evaluation.correct == round(metrics["final_test_accuracy"] * 10000)
    assert evaluation.loss == pytest.approx(metrics["final_test_loss"], rel=1e-4)


def test_readme_figures_exist():
    for name in re.findall(r"\]\((img/[^)]+\.png)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / name).is_file(), name
