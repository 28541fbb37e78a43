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

from normtf import grid, machine
from normtf.job import RUNS_PER_GPU
from normtf.cli import app
from normtf.runs import RunDir
from processes import default_handling, kill_descendant, wait_for

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
                            preexec_fn=default_handling(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))



def epochs_done(run: RunDir) -> int:
    try:
        return len(json.loads(run.history.read_text()))
    except (OSError, ValueError):
        return 0


# --- how many at once -------------------------------------------------------------------------

def test_auto_is_one_job_per_core_and_never_more_than_the_runs(monkeypatch):
    monkeypatch.setattr(machine, "cores", lambda: 8)
    monkeypatch.setattr(machine, "available_memory", lambda: None)
    assert grid.jobs_at_once(None, runs=15) == 8
    assert grid.jobs_at_once(None, runs=5) == 5
    assert grid.jobs_at_once(None, runs=1) == 1
    assert grid.jobs_at_once(None, runs=15, threads=2) == 4  # normtf --threads 2: a job per two cores
    assert grid.jobs_at_once(3, runs=15) == 3 and grid.jobs_at_once(3, runs=2) == 2  # a number asked for is kept
    assert grid.threads_per_job(3, None) == 2 and grid.threads_per_job(8, None) == 1


def test_auto_leaves_room_in_memory_and_shares_gpus(monkeypatch):
    monkeypatch.setattr(machine, "cores", lambda: 64)
    monkeypatch.setattr(machine, "available_memory", lambda: 6 * grid.JOB_MEMORY + 1)
    assert grid.jobs_at_once(None, runs=63) == 6
    monkeypatch.setattr(machine, "available_memory", lambda: None)
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

@pytest.mark.slow
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
def test_each_job_sees_one_of_the_gpus_left_visible_with_memory_growth(tmp_path, monkeypatch):
    """--jobs on a machine with two GPUs of which the user left cards 2 and 3 visible: job 0 trains on
    card 2 and job 1 on card 3 (never 0 and 1, perhaps someone else's), each sharing its card (memory
    growth on), as each run's config.json records. The GPUs are pretended (this machine has none:
    the runs train on its CPU), what each job is given is real."""
    from normtf.config import TrainConfig
    from normtf.job import Options, RunSpec

    monkeypatch.setattr(grid, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    config = TrainConfig(norm="group", epochs=1, train_size=256, test_size=100)
    runs = [RunSpec(config.replace(seed=seed), tmp_path, True, f"seed {seed}") for seed in (1, 2)]
    results = grid.run(runs, jobs=2, options=Options(threads=1))
    environments = [json.loads(r.run.config.read_text())["environment"] for r in results]
    assert sorted(e["cuda_visible_devices"] for e in environments) == ["2", "3"]
    assert all(e["gpu_memory_growth"] for e in environments)


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


def descendants(process) -> list:
    """The processes the test's `process` started (its jobs), as psutil sees them now."""
    import psutil

    return psutil.Process(process.pid).children(recursive=True)


def alive(processes) -> list:
    import psutil

    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in processes if running(p)]


def job_training(process, run: RunDir) -> int:
    """The pid of the job training `run`: the pid its lock names, once that is one of the processes
    this test's `process` started (processes.kill_descendant checks it again as it signals)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            pid = int(run.lock_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid in {p.pid for p in descendants(process)}:
            return pid
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no job of ours holds {run.path}")


# Three runs on two jobs: when the command is stopped, one job trains and a run waits for a job.
THREE = ["compare", "--norm", "group", "--norm", "layer-c", "--norm", "none", *LONGER, "--jobs", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, when", [(signal.SIGKILL, "training"), (signal.SIGKILL, "starting"),
                                          (signal.SIGHUP, "training")])
def test_the_command_killed_or_hung_up_leaves_no_process_and_the_same_command_resumes(tmp_path, signum, when):
    """SIGKILL (no handler runs: each job learns its parent is gone and stops) or SIGHUP (a closed
    terminal: handled as SIGTERM), while the jobs train or while they start: within seconds no
    process of the grid is left, no lock is stale, and the same command finishes every run."""
    args = [*THREE, "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    process = start(*args)
    if when == "training":
        wait_for(lambda: epochs_done(RunDir(tmp_path / "group")) >= 1, process)
    else:
        wait_for(lambda: len(descendants(process)) == 2, process, timeout=60)
    jobs = descendants(process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    if signum == signal.SIGHUP:
        assert process.returncode == 130, err
        assert err.strip().splitlines()[-1].startswith("interrupted: 0 of 3 runs are finished") and "Traceback" not in err
    deadline = time.time() + 10
    while alive(jobs) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(jobs), [p.cmdline() for p in alive(jobs)]

    again = normtf(*args)
    assert again.returncode == 0, again.stderr
    if when == "training":
        assert "group: resuming after epoch 1 of 2" in again.stdout
    for norm in ("group", "layer-c", "none"):
        run = RunDir(tmp_path / norm)
        assert [r["epoch"] for r in run.read_history()] == [1, 2] and run.status() == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_one_job_fails_its_run_only_and_the_same_command_resumes_it(tmp_path, signum):
    """`kill PID` (SIGTERM) or SIGKILL to the job training one run: that run fails in one line, its
    finished epochs kept; the other runs go on; the command exits 3 without a traceback; the same
    command resumes the run."""
    args = [*THREE, "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    process = start(*args)
    victim = RunDir(tmp_path / "group")
    wait_for(lambda: epochs_done(victim) >= 1, process)
    kill_descendant(job_training(process, victim), process, signum)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 3, err
    said = {signal.SIGTERM: "group: failed: its process was stopped (SIGTERM, not by this command) after 1 of 2 "
                            "epochs; they are kept, and the same command resumes it",
            signal.SIGKILL: "group: failed: its process ended (killed by SIGKILL) during training"}[signum]
    assert any(line.startswith(said) for line in out.splitlines()), out
    assert all(RunDir(tmp_path / norm).status() == "finished" for norm in ("layer-c", "none"))  # the others went on
    assert "1 of 3 runs failed" in err and "Traceback" not in err + out
    assert victim.status() == "partial"

    again = normtf(*args)
    assert again.returncode == 0, again.stderr
    assert "group: resuming after epoch 1 of 2" in again.stdout
    assert [r["epoch"] for r in victim.read_history()] == [1, 2] and victim.status() == "finished"


@pytest.mark.slow
def test_ctrl_c_while_the_jobs_start_is_one_line_and_a_second_one_ends_at_once(tmp_path):
    args = [*THREE, "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    process = start(*args)
    wait_for(lambda: len(descendants(process)) == 2, process, timeout=60)
    jobs = descendants(process)
    process.send_signal(signal.SIGINT)  # the jobs are importing TensorFlow
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: 0 of 3 runs are finished; the unfinished ones keep their finished "
                                        "epochs; run the same command again to resume them"]
    assert not alive(jobs)

    process = start(*args)
    wait_for(lambda: epochs_done(RunDir(tmp_path / "group")) >= 1, process)
    jobs = descendants(process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)  # don't wait: the jobs are killed at once
    started = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and time.monotonic() - started < 10, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: ")
    assert not alive(jobs)


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
