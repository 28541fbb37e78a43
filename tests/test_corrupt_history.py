"""A finished run whose history.json was truncated is unfinished, not a dead end: the same
command trains it again after one warning and draws its figures (docs/how-it-works.md,
"Interrupting and resuming")."""

import json

import pytest
from typer.testing import CliRunner

from normtf.cli import app
from normtf.runs import RunDir

TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "200"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def truncate(path):
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.slow
def test_a_truncated_history_of_a_finished_run_is_trained_again_with_one_warning(tmp_path):
    runs, img = tmp_path / "runs", tmp_path / "img"
    group = RunDir(runs / "group")
    assert run("train", "--norm", "group", *TINY, "--runs-dir", runs).exit_code == 0

    truncate(group.history)
    result = run("compare", "--norm", "group", *TINY, "--runs-dir", runs, "--img-dir", img)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "history.json is truncated or corrupt" in warnings[0], result.output
    assert "the run is treated as unfinished; training it again" in warnings[0]
    assert [r["epoch"] for r in group.read_history()] == [1]
    assert json.loads(group.metrics.read_text())["status"] == "finished" and group.model.is_file()
    assert (img / "loss_accuracy.png").is_file() and (img / "misclassified_group.png").is_file()
    assert not group.replaced_dir.exists()  # the old run went once the new one had its epoch

    truncate(group.history)  # and `train`, the other command
    result = run("train", "--norm", "group", *TINY, "--runs-dir", runs)
    assert result.exit_code == 0 and "training it again" in result.output and "trained" in result.output
    assert [r["epoch"] for r in group.read_history()] == [1]
