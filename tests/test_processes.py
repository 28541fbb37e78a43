"""The tests' own process helpers (tests/processes.py), on small processes of their own: a child
given the default handling of the signals a test sends, a pid signalled only under a process the
test started, and a process session ended whole with nothing outside it touched."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from processes import default_handling, end_session, kill_descendant, session

SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]


def test_a_child_gets_the_default_handling_of_the_signal_it_is_sent():
    """Started as a script's `pytest &` starts, with SIGINT ignored, a child keeps ignoring it,
    unless default_handling restores it: Python then makes Ctrl-C its KeyboardInterrupt."""
    check = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        inherited = subprocess.run(check, capture_output=True, text=True, timeout=60).stdout
        restored = subprocess.run(check, capture_output=True, text=True, timeout=60,
                                  preexec_fn=default_handling(signal.SIGINT)).stdout
    finally:
        signal.signal(signal.SIGINT, before)
    assert (inherited, restored) == ("False\n", "True\n")


def test_only_a_descendant_of_a_process_the_test_started_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"child = subprocess.Popen({SLEEP!r})\n"
                               "print(child.pid, flush=True)\nprint(child.wait(), flush=True)"],
                              stdout=subprocess.PIPE, text=True)
    stranger = subprocess.Popen(SLEEP)  # this test's too, but not under `parent`: as a reused pid would be
    try:
        grandchild = int(parent.stdout.readline())
        with pytest.raises(AssertionError, match=f"pid {stranger.pid} is not a descendant of pid {parent.pid}"):
            kill_descendant(stranger.pid, parent)
        assert stranger.poll() is None  # not signalled
        kill_descendant(grandchild, parent)
        assert parent.stdout.readline() == f"{-signal.SIGKILL}\n"  # the grandchild's exit, as its parent saw it
    finally:
        for process in (stranger, parent):
            process.kill()
            process.wait()


def test_ending_a_session_ends_every_process_in_it_and_nothing_outside_it():
    """A leader whose child sits in a process group of its own and ignores SIGTERM (as a Ray
    worker in its raylet's session): both end; a process in another session (a user's own Ray)
    does not."""
    outside = subprocess.Popen(SLEEP, start_new_session=True)
    leader = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, time\n"
                               "stubborn = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(300)'], "
                               "preexec_fn=os.setpgrp)\n"
                               "time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        leader.stdout.readline()  # the child ignores SIGTERM now
        members = session(leader.pid)
        assert len(members) == 2 and len({member.pid for member in members}) == 2
        stubborn = next(member for member in members if member.pid != leader.pid)
        assert os.getpgid(stubborn.pid) == stubborn.pid != os.getpgid(leader.pid)  # a group of its own
        assert end_session(leader, grace=10) == [] and session(leader.pid) == []
        assert leader.returncode == -signal.SIGTERM and dead(stubborn)  # SIGKILLed: it ignored the SIGTERM
        assert outside.poll() is None
    finally:
        for process in (leader, outside):
            process.kill()
            process.wait()


def dead(process: psutil.Process) -> bool:
    """Gone, or a zombie: dead, and left for its parent (here init) to reap."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
