"""Two real worker processes on 127.0.0.1, as tests/test_distributed.py starts them: a rerun of a
finished run, a killed non-chief's scratch directory, and what a survivor prints when a worker
dies. The workers' environment is a user's: the tests do not set TF_CPP_MIN_LOG_LEVEL."""

import json
import re
import signal
import time

import pytest
from test_distributed import WORKER_TIMEOUT, finish, normtf_train, start_workers

TINY = ["--norm", "group", "--train-size", "512", "--test-size", "200"]
RUNTIME_LINE = re.compile(r"\.cc:\d+\]")  # TensorFlow's C++ log lines name their source file and line


def start(command, tmp_path, name, verbose=()):
    """Both workers as a user starts them (TF_CPP_MIN_LOG_LEVEL as the environment has it: unset
    by normtf's tests), temporary files under tmp_path/tmp for every start, as one machine's /tmp is."""
    return start_workers(command, tmp_path, name, scratch="tmp", log_level=None, verbose=verbose)


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
    workers = start(command, tmp_path, "verbose", verbose=(0,))
    kill_after_epoch_1(workers, tmp_path / "runs" / "group" / "history.json")
    codes, errors = finish(workers, tmp_path, "verbose", timeout=90)
    assert codes[0] == 1, errors[0][-3000:]
    assert [line for line in errors[0].splitlines() if RUNTIME_LINE.search(line)], errors[0][-3000:]
    assert "start every worker again to resume" in errors[0]
