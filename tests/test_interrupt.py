"""Real `normtf train` and `normtf compare` processes, killed and interrupted mid-run, then run again."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from normtf.evaluation import evaluate_file
from normtf.runs import RunDir
from processes import default_handling

# Two epochs of 24 steps: time to stop a run inside epoch 2, which takes seconds.
ARGS = ["--norm", "group", "--epochs", "2", "--train-size", "3000", "--test-size", "1000", "--deterministic"]


def start(runs_dir, command="train", args=ARGS):
    where = ["--runs-dir", str(runs_dir)] + (["--img-dir", str(runs_dir / "img")] if command == "compare" else [])
    # Ctrl-C and SIGTERM as in a terminal: a suite started in the background (`nohup pytest &`)
    # hands its children SIGINT ignored, and normtf rightly keeps ignoring it then.
    return subprocess.Popen([sys.executable, "-m", "normtf", command, *args, *where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=default_handling(signal.SIGINT, signal.SIGTERM))


def wait_for_epochs(run: RunDir, count: int, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.history.exists() and len(json.loads(run.history.read_text())) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no epoch {count} within {timeout}s")


def weights(run: RunDir):
    from normtf.evaluation import load_model

    return [np.asarray(w) for w in load_model(run.model).get_weights()]


@pytest.mark.slow
def test_sigkill_during_epoch_2_then_rerun_gives_every_epoch_once_and_the_same_model(tmp_path, dataset):
    run = RunDir(tmp_path / "killed" / "group")
    process = start(tmp_path / "killed")
    wait_for_epochs(run, 1, process)
    time.sleep(0.5)  # well inside epoch 2
    process.kill()
    process.wait()
    assert run.status() == "partial" and not run.metrics.exists()

    rerun = start(tmp_path / "killed")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    history = run.read_history()
    assert [r["epoch"] for r in history] == [1, 2]
    metrics = run.read_metrics()
    evaluation = evaluate_file(run.model, dataset, test_size=1000)
    assert evaluation.correct == round(metrics["final_test_accuracy"] * 1000)

    straight = start(tmp_path / "straight")
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    for resumed, uninterrupted in zip(weights(run), weights(RunDir(tmp_path / "straight" / "group"))):
        np.testing.assert_array_equal(resumed, uninterrupted)


# Ctrl-C as the README's quick start meets it (`normtf compare`), SIGTERM as a job scheduler sends it.
@pytest.mark.slow
@pytest.mark.parametrize("command, signum", [("compare", signal.SIGINT), ("train", signal.SIGTERM)])
def test_sigint_and_sigterm_keep_finished_epochs_and_say_how_to_resume(tmp_path, command, signum):
    run = RunDir(tmp_path / "group")
    process = start(tmp_path, command)
    wait_for_epochs(run, 1, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "run the same command again to resume" in err and "Traceback" not in err + out
    kept = len(run.read_history())
    assert kept >= 1 and not run.metrics.exists()
    with h5py.File(run.checkpoint(kept)) as checkpoint:
        assert len(checkpoint.keys()) > 0
    rerun = start(tmp_path, command)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert [r["epoch"] for r in run.read_history()] == [1, 2]
    if command == "compare":
        assert (tmp_path / "img" / "loss_accuracy.png").exists()


@pytest.mark.slow
def test_a_second_process_on_the_same_run_is_refused_with_the_holders_pid(tmp_path):
    run = RunDir(tmp_path / "group")
    longer = [*ARGS, "--epochs", "10"]  # still training when the second process, starting TensorFlow, gets there
    first = start(tmp_path, args=longer)
    wait_for_epochs(run, 1, first)
    second = start(tmp_path, args=longer)
    out, err = second.communicate(timeout=120)
    first.kill()
    first.wait()
    assert second.returncode == 1
    assert f"another normtf process (pid {first.pid}) is training into" in " ".join(err.split())


def test_sigterm_in_epoch_2_exits_130_keeps_epoch_1_and_the_same_command_finishes(tmp_path, monkeypatch):
    """The slow tests' contract, cheaply: `normtf train` in this process, sent SIGTERM as epoch 2
    begins (by the progress bar the command adds to every run), exits 130 with the line saying
    how to resume and epoch 1 kept; the same command again trains epoch 2 alone."""
    from typer.testing import CliRunner

    from normtf import progress
    from normtf.cli import app

    class TermInEpoch2(progress.EpochProgress):
        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            if epoch == 1:
                signal.raise_signal(signal.SIGTERM)

    command = ["train", "--norm", "group", "--epochs", "2", "--train-size", "512", "--test-size", "200",
               "--runs-dir", str(tmp_path)]
    run = RunDir(tmp_path / "group")
    with monkeypatch.context() as patch:
        patch.setattr(progress, "EpochProgress", TermInEpoch2)
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 130, result.output
    assert "run the same command again to resume" in result.output and "Traceback" not in result.output
    assert [r["epoch"] for r in run.read_history()] == [1] and not run.metrics.exists()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in run.read_history()] == [1, 2] and run.read_metrics()["status"] == "finished"
