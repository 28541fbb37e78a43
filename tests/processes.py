"""The processes a test starts, and only those. A pid read from a file (a run's lock names the
process training it) is signalled only if it is a descendant of a process the test started and
still holds: by then that pid may have been reused by someone else's process. A process session the
test started (a Ray head) is stopped as a whole, nothing outside it touched. And a child is given
the default handling of the signals the test sends it, as a terminal would: a suite started from a
script under `&` hands its children SIGINT ignored, and they rightly keep ignoring it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil


def default_handling(*signums: int):
    """A Popen preexec_fn: the child starts with each of `signums` at its default handling,
    whatever this process was started with."""
    def restore():
        for signum in signums:
            signal.signal(signum, signal.SIG_DFL)

    return restore


def kill_descendant(pid: int, ancestor: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to `pid` if it is a descendant of `ancestor`, a process this test started and
    has not waited for (so its pid is still its own); else fail the test, sending nothing. psutil
    sends it only if `pid` is still the process it found (same start time), not a reused pid."""
    for process in psutil.Process(ancestor.pid).children(recursive=True):
        if process.pid == pid:
            process.send_signal(signum)
            return
    raise AssertionError(f"pid {pid} is not a descendant of pid {ancestor.pid}, which this test started: "
                         "not signalled")


def session(leader: int) -> list[psutil.Process]:
    """The processes in the session that pid `leader` started (Popen(start_new_session=True)): every
    one it started and they started, whatever process group each put itself in, unless one left
    for a session of its own; not the dead ones (zombies) left for their parent to reap. Linux
    gives no new process a pid still in use as a session's id, so the list is right after the
    leader itself has gone too."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            continue  # gone meanwhile
    return found


def end_session(leader: subprocess.Popen, grace: float = 60) -> list[psutil.Process]:
    """Stop the session `leader` leads: SIGTERM to the leader, so that it stops the rest its own way
    (`ray start --block` drains its node and ends every Ray process it started), `grace` seconds
    for it, then SIGKILL to whatever of the session is left. Returns what is still there after
    that (nothing, but for a process that cannot be killed)."""
    if leader.poll() is None:
        leader.terminate()
        try:
            leader.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for process in session(leader.pid):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    leader.wait()
    deadline = time.monotonic() + 30
    while (left := session(leader.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)  # killed orphans are reaped by init in their own time
    return left


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll `condition` until it holds; fail if `process` (which the test started) ends first, with
    its output, or after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")
