"""A grid of runs side by side (`--jobs`): how many at once, the same numbers as one at a time, one
line per run in a log, a killed job, Ctrl-C and resume, two commands on one runs directory."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from normtf import grid
from normtf.job import RUNS_PER_GPU
from normtf.cli import app
from normtf.runs import RunDir
from processes import kill_descendant

TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "200"]
# Two epochs of 1,500 images: time to stop a run inside epoch 2.
LONGER = ["--epochs", "2", "--train-size", "1500", "--test-size", "200", "--deterministic"]


def normtf(*args, cwd=None, **kwargs):
    """`normtf ...` as a user runs it, its output piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "normtf", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, **kwargs)


def start(*args):
    """`normtf ...` in the background; SIGINT as a terminal delivers it (see test_interrupt.py)."""
    return subprocess.Popen([sys.executable, "-m", "normtf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def epochs_done(run: RunDir) -> int:
    try:
        return len(json.loads(run.history.read_text()))
    except (OSError, ValueError):
        return 0


# --- how many at once -------------------------------------------------------------------------

def test_auto_is_one_job_per_core_and_never_more_than_the_runs(monkeypatch):
    monkeypatch.setattr(grid, "cores", lambda: 8)
    monkeypatch.setattr(grid, "available_memory", lambda: None)
    assert grid.jobs_at_once(None, runs=15) == 8
    assert grid.jobs_at_once(None, runs=5) == 5
    assert grid.jobs_at_once(None, runs=1) == 1
    assert grid.jobs_at_once(None, runs=15, threads=2) == 4  # normtf --threads 2: a job per two cores
    assert grid.jobs_at_once(3, runs=15) == 3 and grid.jobs_at_once(3, runs=2) == 2  # a number asked for is kept
    assert grid.threads_per_job(3, None) == 2 and grid.threads_per_job(8, None) == 1


def test_auto_leaves_room_in_memory_and_shares_gpus(monkeypatch):
    monkeypatch.setattr(grid, "cores", lambda: 64)
    monkeypatch.setattr(grid, "available_memory", lambda: 6 * grid.JOB_MEMORY + 1)
    assert grid.jobs_at_once(None, runs=63) == 6
    monkeypatch.setattr(grid, "available_memory", lambda: None)
    assert grid.jobs_at_once(None, runs=63, gpus=1) == RUNS_PER_GPU
    assert grid.jobs_at_once(None, runs=63, gpus=2) == 2 * RUNS_PER_GPU


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be auto or a whole number from 1 to 256"),
    (["--jobs", "two"], "--jobs must be auto or a whole number from 1 to 256"),
    (["--jobs", "2", "--strategy", "mirrored"], "use one or the other"),
])
def test_bad_jobs_are_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["compare", "--all", *TINY, "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # refused before anything was written


# --- side by side ------------------------------------------------------------------------------

def test_two_jobs_train_both_runs_with_a_line_each_in_a_log(tmp_path):
    result = normtf("compare", "--norm", "group", "--norm", "batch", *TINY, "--jobs", "2",
                    "--runs-dir", tmp_path / "runs", "--img-dir", tmp_path / "img")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "training 2 runs, 2 at a time, 1 thread each" in lines
    for norm in ("group", "batch"):
        assert RunDir(tmp_path / "runs" / norm).status() == "finished"
        assert any(line.startswith(f"{norm} epoch  1/1  train loss") for line in lines)
        assert any(line.startswith(f"{norm}: finished, test accuracy") for line in lines)
    config = json.loads((tmp_path / "runs" / "group" / "config.json").read_text())
    assert config["environment"]["threads"] == {"intra_op": 1, "inter_op": 1}  # 2 cores shared by 2 jobs
    # (A second command reuses them without a job: the slow test of two commands checks it.)


@pytest.mark.slow
def test_deterministic_runs_are_the_same_alone_or_side_by_side(tmp_path):
    """--jobs 1 trains in this process, --jobs 3 in three: history and weights are the same bits,
    because --deterministic gives every run one thread whatever the jobs (the thread count
    changes TensorFlow's sums: docs/speed.md)."""
    args = ["compare", "--norm", "group", "--norm", "batch", "--norm", "layer", *TINY, "--deterministic"]
    for jobs in ("1", "3"):
        result = normtf(*args, "--jobs", jobs, "--runs-dir", tmp_path / jobs, "--img-dir", tmp_path / jobs / "img")
        assert result.returncode == 0, result.stderr
    for norm in ("group", "batch", "layer"):
        one, three = RunDir(tmp_path / "1" / norm), RunDir(tmp_path / "3" / norm)
        strip = lambda records: [{k: v for k, v in r.items() if k != "epoch_time"} for r in records]  # noqa: E731
        assert strip(one.read_history()) == strip(three.read_history())
        for a, b in zip(model_weights(one), model_weights(three)):
            np.testing.assert_array_equal(a, b)


def model_weights(run: RunDir) -> list[np.ndarray]:
    from normtf.evaluation import load_model

    return [np.asarray(w) for w in load_model(run.model).get_weights()]


@pytest.mark.slow
def test_a_killed_job_fails_its_run_only_and_the_same_command_resumes_it(tmp_path):
    args = ["compare", "--norm", "group", "--norm", "layer-c", *LONGER, "--jobs", "2",
            "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    process = start(*args)
    victim, other = RunDir(tmp_path / "group"), RunDir(tmp_path / "layer-c")
    wait_for(lambda: epochs_done(victim) >= 1, process)
    kill_descendant(int(victim.lock_file.read_text()), process)  # the job's process, as the run's lock names it
    out, err = process.communicate(timeout=300)
    assert process.returncode == 3, err
    assert other.status() == "finished"  # the other job went on
    assert "group: failed: its process ended (killed by SIGKILL) during training" in out
    assert "1 of 2 runs failed" in err and "Traceback" not in err
    assert victim.status() == "partial"

    again = normtf(*args)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in victim.read_history()] == [1, 2]
    assert "training 1 run, " not in again.stdout  # one run left: trained here, no pool
    assert victim.status() == "finished"


@pytest.mark.slow
def test_ctrl_c_stops_every_job_in_one_line_and_the_same_command_resumes_them(tmp_path):
    # Five epochs, not two: on a loaded machine one job can start seconds after the other, and
    # with two epochs the first had finished before the second logged its first (CI, 2026-12-05).
    args = ["compare", "--norm", "group", "--norm", "batch", "--epochs", "5", "--train-size", "1500",
            "--test-size", "200", "--deterministic", "--jobs", "2",
            "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    process = start(*args)
    runs = [RunDir(tmp_path / "group"), RunDir(tmp_path / "batch")]
    wait_for(lambda: all(epochs_done(run) >= 1 for run in runs), process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("interrupted: 0 of 2 runs are finished; the unfinished ones keep their "
                                            "finished epochs; run the same command again to resume them")
    assert "Traceback" not in err
    assert all(run.status() == "partial" and not run.lock_file.exists() for run in runs)

    again = normtf(*args)
    assert again.returncode == 0, again.stderr
    for run in runs:
        assert [r["epoch"] for r in run.read_history()] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_two_commands_on_one_runs_dir_train_every_run_once(tmp_path):
    """The run lock holds across jobs: what one command's job trains, the other's is told is
    busy (or finds finished: "reused"), and each run is trained by exactly one of them."""
    norms = ["group", "batch", "layer-c", "layer"]
    args = ["compare", *[a for n in norms for a in ("--norm", n)], *TINY, "--jobs", "2",
            "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    first, second = start(*args), start(*args)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    trained = [line.split(":")[0] for out, _ in outputs for line in out.splitlines()
               if line.endswith(tuple("0123456789%")) and ": finished, test accuracy" in line]
    assert sorted(trained) == sorted(norms)  # each once, by one command or the other
    assert {first.returncode, second.returncode} <= {0, 1}
    for (out, err), process in zip(outputs, (first, second)):
        if process.returncode == 1:
            assert "were being trained by another normtf process" in err
    assert all(RunDir(tmp_path / n).status() == "finished" for n in norms)
    last = normtf(*args)
    assert last.returncode == 0 and "training" not in last.stdout  # every run reused, one figure of all
