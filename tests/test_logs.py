"""normtf as a job writes it to a log: piped output is whole lines (no 80-column wrap, no progress
bars), and Ctrl-C or SIGTERM at any moment, from TensorFlow's start to the process's exit, is the
one line `interrupted` and exit code 130 (docs/how-it-works.md, "Exit codes")."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from processes import default_handling

ROOT = Path(__file__).resolve().parent.parent
INTERRUPTED = "interrupted; finished runs and epochs are kept\n"


def normtf(*args, pythonpath=(), **popen):
    """`normtf ARGS` as a user starts it (python -m normtf runs the same main), this checkout's
    code first; TensorFlow's log level as a user has it (unset); Ctrl-C and SIGTERM handled as in
    a terminal, even where the suite runs under `&` in a script (SIGINT ignored there)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    return subprocess.Popen([sys.executable, "-m", "normtf", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_handling(signal.SIGINT, signal.SIGTERM), **popen)


def test_a_piped_train_is_whole_lines_and_a_sigterm_while_it_exits_is_130(tmp_path):
    """The issue's log: a long --runs-dir split across lines, epoch lines split at 80 columns.
    Here every line is whole, and no progress bar is drawn. Then a SIGTERM after the last line,
    while the process exits (a slow exit function stands in for TensorFlow's teardown, which is
    where 143 came from), still ends in the one line and 130."""
    runs = tmp_path / "runs_for_the_normalization_study_with_a_path_longer_than_eighty_columns" / "of_a_terminal"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, sys, time\n"
        "atexit.register(lambda: (sys.stderr.write('exiting\\n'), sys.stderr.flush(), time.sleep(60)))\n")
    process = normtf("train", "--norm", "group", "--epochs", "2", "--train-size", "512", "--test-size", "200",
                     "--runs-dir", runs, pythonpath=[hooks])
    assert process.stderr.readline() == "exiting\n"  # the command is done, the process is exiting
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == INTERRUPTED, err

    lines = out.splitlines()
    assert f"files in {runs}/group" in lines, out
    epochs = [line for line in lines if line.startswith("group epoch")]
    assert len(epochs) == 2 and all(
        re.fullmatch(r"group epoch +\d/2  train loss [\d.]+ acc [\d.]+%   test loss [\d.]+ acc [\d.]+%", line)
        for line in epochs), out
    assert "\r" not in out and "━" not in out and "\x1b" not in out  # no bar, no cursor movement


def test_ctrl_c_while_tensorflow_starts_prints_only_our_line(tmp_path):
    """Ctrl-C once TensorFlow has written its start-up lines (into the file they are hidden in:
    its size is read through /proc) shows none of them: `interrupted` alone, exit code 130."""
    process = normtf("train", "--norm", "group", "--epochs", "1", "--train-size", "512", "--runs-dir", tmp_path)
    hidden = f"/proc/{process.pid}/fd/2"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "(deleted)" in os.readlink(hidden) and os.stat(hidden).st_size > 0:
                break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("TensorFlow's start-up lines were never written to the hidden file")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == INTERRUPTED, err
    assert not (tmp_path / "group").exists()
