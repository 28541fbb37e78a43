"""Two real worker processes on 127.0.0.1, as tests/test_distributed.py starts them: a rerun of a
finished run, a killed non-chief's scratch directory, and what a survivor prints when a worker
dies. The workers' environment is a user's: no TF_CPP_MIN_LOG_LEVEL."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_distributed import WORKER_TIMEOUT, finish, normtf_train, tf_configs

TINY = ["--norm", "group", "--train-size", "512", "--test-size", "200"]
RUNTIME_LINE = re.compile(r"\.cc:\d+\]")  # TensorFlow's C++ log lines name their source file and line


def start(command, tmp_path, name, scratch="tmp", verbose=(False, False)):
    """Both workers running `normtf [--verbose] <command>` (per worker), output in
    tmp_path/<name>-<i>.out/.err, temporary files under tmp_path/<scratch> (shared by starts
    that pass the same one, as one machine's /tmp is)."""
    (tmp_path / scratch).mkdir(exist_ok=True)
    workers = []
    for i, tf_config in enumerate(tf_configs()):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        env.update(TF_CONFIG=tf_config, TMPDIR=str(tmp_path / scratch))
        argv = [command[0], *(["--verbose"] if verbose[i] else []), *command[1:]]
        with open(tmp_path / f"{name}-{i}.out", "w") as out, open(tmp_path / f"{name}-{i}.err", "w") as err:
            workers.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=tmp_path))
    return workers


def scratch_dirs(tmp_path):
    """normtf's directories in the workers' temporary directory. (A killed worker also leaves
    TensorFlow's own __autograph_generated_file*.py there, which only TensorFlow could remove.)"""
    return [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("normtf")]


def kill_after_epoch_1(workers, history, killed=1):
    deadline = time.monotonic() + WORKER_TIMEOUT
    while not history.exists() and time.monotonic() < deadline and workers[0].poll() is None:
        time.sleep(0.05)
    assert history.exists(), "the chief never finished epoch 1"
    workers[killed].send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_a_rerun_of_a_finished_run_ends_every_worker_with_code_0_and_one_line(tmp_path):
    command = normtf_train(tmp_path / "runs", *TINY, "--epochs", "1")
    codes, errors = finish(start(command, tmp_path, "first"), tmp_path, "first")
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]

    codes, errors = finish(start(command, tmp_path, "rerun"), tmp_path, "rerun")
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    chief, other = ((tmp_path / f"rerun-{i}.out").read_text() for i in range(2))
    assert "already holds this finished run" in " ".join(chief.split())  # rich wraps at 80 columns
    assert other.strip().splitlines() == ["worker 1 of 2: finished; the chief already holds this finished run "
                                          "(pass --force to every worker to train it again)"], other
    assert "error" not in errors[1] and "Traceback" not in errors[1], errors[1][-2000:]


@pytest.mark.slow
def test_a_killed_non_chief_leaves_nothing_and_the_survivor_prints_one_line_last(tmp_path):
    """SIGKILL worker 1 after epoch 1: its scratch run directory stays (it could not remove it);
    the chief stops with normtf's one line as the last thing it prints and none of TensorFlow's
    C++ lines. Both started again: the run finishes and the scratch directories are all gone."""
    command = normtf_train(tmp_path / "runs", *TINY, "--epochs", "2")
    history = tmp_path / "runs" / "group" / "history.json"
    workers = start(command, tmp_path, "killed")
    kill_after_epoch_1(workers, history)
    codes, errors = finish(workers, tmp_path, "killed", timeout=90)
    assert codes[0] == 1 and codes[1] == -signal.SIGKILL
    assert [p.name.split("-")[:2] for p in scratch_dirs(tmp_path)] == [["normtf", "scratch"]]
    lines = errors[0].strip().splitlines()
    assert lines[-1].startswith("error: worker 0 of 2:") and "start every worker again to resume" in lines[-1], lines
    assert not [line for line in lines if RUNTIME_LINE.search(line)], errors[0][-3000:]
    assert "Traceback" not in errors[0]

    codes, errors = finish(start(command, tmp_path, "resumed"), tmp_path, "resumed")
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert [r["epoch"] for r in json.loads(history.read_text())] == [1, 2]
    assert scratch_dirs(tmp_path) == []


@pytest.mark.slow
def test_with_verbose_a_survivor_shows_tensorflows_own_lines(tmp_path):
    """The same death with `normtf --verbose` on the chief: TensorFlow's C++ lines are shown."""
    command = normtf_train(tmp_path / "runs", *TINY, "--epochs", "2")
    workers = start(command, tmp_path, "verbose", verbose=(True, False))
    kill_after_epoch_1(workers, tmp_path / "runs" / "group" / "history.json")
    codes, errors = finish(workers, tmp_path, "verbose", timeout=90)
    assert codes[0] == 1, errors[0][-3000:]
    assert [line for line in errors[0].splitlines() if RUNTIME_LINE.search(line)], errors[0][-3000:]
    assert "start every worker again to resume" in errors[0]
