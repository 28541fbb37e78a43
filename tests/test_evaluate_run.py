"""`normtf evaluate` reports the run's numbers: on the run's own dataset and test set (each said in
the output), each confusion matrix of its own model, and a wrong directory or size refused in one
line naming the flag (exit code 2)."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normtf.cli import app

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_directory_of_another_datasets_files_is_refused_not_scored(mnist_dir):
    """The issue's command: a Fashion-MNIST run given MNIST files printed accuracy 13.12%."""
    line = one_line_error(run("evaluate", ROOT / "results/reference/fashion-mnist/layer/seed-44",
                              "--data-dir", mnist_dir), 2)
    assert f"--data-dir {mnist_dir} holds MNIST files, not Fashion-MNIST" in line and "accuracy" not in line


def test_a_test_size_beyond_the_test_set_names_the_flag():
    line = one_line_error(run("evaluate", ROOT / "results/reference/group/seed-42", "--test-size", "20000"), 2)
    assert line == "error: --test-size 20000 is more than the 10,000 test images there are"


def matrices(output: str) -> list[list[list[int]]]:
    """The confusion matrices printed, in order: each a list of rows of ten counts."""
    found, rows = [], []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 11 and cells[0].isdigit():
            rows.append([0 if c == "·" else int(c) for c in cells[1:]])
            if len(rows) == 10:
                found.append(rows)
                rows = []
    return found


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    """A batch-norm run trained on 512 images and tested on a 1,000-image subset."""
    runs = tmp_path_factory.mktemp("evaluate") / "runs"
    result = run("train", "--norm", "batch", "--epochs", "1", "--train-size", "512", "--test-size", "1000",
                 "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    return runs / "batch"


def test_precise_bn_prints_each_models_own_confusion_matrix(batch_run):
    """The moving-average model's matrix and the two precise models' (dropout on, then off), each
    titled; each diagonal is the correct count printed beside its accuracy (the precise one used to
    repeat the first); the precise ones are evaluate_file's, in that order."""
    from normtf import data
    from normtf.evaluation import evaluate_file

    result = run("evaluate", batch_run, "--precise-bn")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "confusion matrix with the moving averages of training" in text
    assert "confusion matrix with precise batch-norm statistics, dropout on, as in training" in text
    assert "confusion matrix with precise batch-norm statistics, dropout off, as at test time" in text
    correct = [int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) of 1,000 correct\)", text)]
    found = matrices(result.output)
    assert [sum(m[k][k] for k in range(10)) for m in found] == correct and len(correct) == 3
    assert all(sum(map(sum, m)) == 1000 for m in found)
    mnist = data.load("mnist")
    assert correct[1:] == [evaluate_file(batch_run, mnist, 1000, precise_bn=True, dropout=dropout).correct
                           for dropout in (True, False)]
    assert correct[0] != correct[2]


def test_the_runs_own_test_set_by_default_and_test_size_overrides(batch_run):
    """A run trained with --test-size 1000 is scored on those 1,000 images (its metrics.json's
    accuracy, to the image), and the output says so; --test-size chooses another subset."""
    metrics = json.loads((batch_run / "metrics.json").read_text())
    text = " ".join(run("evaluate", batch_run).output.split())
    assert ("test set: 1,000 of the 10,000 MNIST test images, the seeded class-stratified subset: the run's own "
            "(its config.json's test_size)") in text
    assert f"({round(metrics['final_test_accuracy'] * 1000):,} of 1,000 correct)" in text

    text = " ".join(run("evaluate", batch_run, "--test-size", "500").output.split())
    assert "test set: 500 of the 10,000 MNIST test images, the seeded class-stratified subset: --test-size" in text
    assert "of 500 correct" in text

    text = " ".join(run("evaluate", ROOT / "results/reference/group/seed-42").output.split())
    assert "test set: all 10,000 MNIST test images, as the run was tested" in text
