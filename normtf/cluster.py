"""A grid's runs as tasks on a Ray cluster (`--cluster ADDRESS`; normtf.grid hands them over).

Ray because ML grids already run on it (Ray Tune's), and it schedules fractions of a GPU, which is
what a 9,910-parameter model needs of one. Each run is a task with `threads` CPUs (normtf --threads;
1 by default, the most images per core) and, where the cluster has GPUs, 1/RUNS_PER_GPU of one.

A task runs the job a local grid runs (normtf.job: a fresh process in a session of its own, which
trains the run as `normtf train` does and sets GPU memory growth), gives it its one run, relays its
events to the driver and returns how the run ended. So a run goes on Ray the way it goes on this
machine; what Ray adds:

- The driver holds each run's lock from before its task is sent until its result is written, so
  two commands on one runs directory train each run once, whether or not the workers share it. The
  lock file names this command's token: a worker that reads it there shares the driver's disk, and
  its job trains in place under that lock (RunDir.locked: the token makes it the job's). One that
  does not trains in a scratch directory seeded with the run's files as the driver has them (so an
  interrupted run resumes there too) and returns the run's files, which replace the driver's whole
  or not at all (RunDir.replace). No scratch directory outlives its task: the task removes it, and
  its job does if the task's worker is killed first.
- A job that ends without ending its run, not stopped by this command (`kill PID`, a node drained,
  out of memory), raises JobLost in its task, which Ray retries once as it retries a lost worker:
  on a shared disk the retry resumes from the last finished epoch, elsewhere from the files the task
  was sent. Lost again, the run is failed (its files, from a scratch directory too, written back).
- Ctrl-C, SIGTERM or SIGHUP to the driver cancels the tasks, and each task passes the stop on to its
  job and waits for it to keep its finished epochs. A second signal, or STOP_WAIT seconds without an
  end, force-cancels every task: Ray kills the workers, and each job, its parent gone, stops.

What Ray 2.60 does here, measured: a task runs on its worker's main thread (threading.main_thread(),
thread id = pid), so the job's PR_SET_PDEATHSIG, tied to the thread that started it, fires only when
the worker dies. Ray's cancel is a simulated SIGINT in that thread: it calls the task's own SIGINT
handler, between Python bytecodes, and does not wake a blocking call (a select() of 5 s woke after
5 s), so the task waits for its job in steps of a quarter second. That thread blocks SIGINT, and a
process it starts inherits the mask: the job unblocks its stop signals (normtf.job.main). A worker
sent SIGTERM exits by Ray's own handler (SystemExit), which the task replaces while it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path

from normtf.errors import STOP_SIGNALS, CorruptFile, NormtfError, RunLocked, UsageError
from normtf.files import atomic_write
from normtf.job import (RUNS_PER_GPU, STOP_WAIT, Job, Options, RunSpec, busy, epochs_kept, failed, signals_to,
                        stopped)
from normtf.norms import relevant

CLIENT_SERVER_LOST = "Starting Ray client server failed"  # Ray's words for it (ray.util.client.server.proxier)
SCRATCH = "normtf-ray-"  # a task's scratch directory in its worker's temp dir: then <worker pid>-<random>
RETRIES = 1  # Ray runs a lost task once more


class JobLost(Exception):
    """A task's job ended without ending its run, and this command did not stop it: killed, stopped
    by a signal from elsewhere, out of memory. Raised in the task so that Ray retries it
    (retry_exceptions), as it retries a task whose worker was lost. `files`: the run's files as the
    job left them in a scratch directory (None on a shared disk), written back if it is lost for good."""

    def __init__(self, reason: str, short: str, files: dict | None = None):
        super().__init__(reason)
        self.reason, self.short, self.files = reason, short, files

    def __reduce__(self):  # Ray sends it back to the driver pickled
        return type(self), (self.reason, self.short, self.files)


def _ray(address: str):
    if address == "local":  # a throwaway Ray serves this process only: on loopback, as Ray keeps it on macOS
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UsageError("--cluster needs Ray, which is not installed: pip install 'normtf[ray]' "
                         "(and the same on every node of the cluster)") from None
    return ray


def run(runs: list[RunSpec], todo: list[int], results: list, address: str, jobs: int | None,
        options: Options, display, warn) -> list:
    """Train runs[i] for i in todo on the Ray cluster at `address` ("local": a throwaway Ray on this
    machine); fill `results` in place and return it. jobs: at most that many tasks at once (None:
    as many as the cluster schedules)."""
    ray = _ray(address)
    _answers(address)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for attempt in (1, 2):
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=options.verbose,
                     **({"include_dashboard": False} if address == "local" else {}))
            break
        except (ConnectionError, RuntimeError, ValueError) as e:
            # A Ray Client server sometimes loses the server it starts for this client at birth (seen
            # with Ray 2.60: "Epoll1Poller ... Bad file descriptor" in that server's log): once more.
            if attempt == 2 or CLIENT_SERVER_LOST not in str(e):
                raise _unreachable(address, _reason(e)) from None
            ray.shutdown()
        finally:  # ray.init makes SIGTERM exit the driver (status 15, no word): normtf's handling stays
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    try:
        where = f" on the Ray cluster at {address}" if address != "local" else " on a local Ray"
        return _Driver(ray, runs, todo, results, jobs, options, display, where, warn).run()
    finally:
        ray.shutdown()


def _unreachable(address: str, reason: str) -> NormtfError:
    return NormtfError(f"could not reach a Ray cluster at {address!r}: {reason}; start one with `ray start --head` "
                       "and pass its address (or auto on its head node), or use --cluster local")


def _answers(address: str) -> None:
    """Refuse at once an address where nothing listens: Ray would retry it for many minutes in silence
    (a GCS address: over 10 minutes, measured with Ray 2.60). auto is RAY_ADDRESS where that is set,
    as Ray reads it; else Ray finds the cluster of this node, or says at once that there is none.
    "local" is a new Ray of this process's own."""
    target = address
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        target = os.environ["RAY_ADDRESS"]
    host, colon, port = target.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # not host:port; Ray says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        where = f"{address!r} (RAY_ADDRESS={target})" if target != address else repr(address)
        raise NormtfError(f"could not reach a Ray cluster at {where}: nothing answers at {host}:{port} "
                          f"({e.strerror or type(e).__name__}); start one with `ray start --head` and pass its "
                          "address (or auto on its head node), or use --cluster local") from None


class _Driver:
    """Locks each run, sends it as a task (at most `jobs` at once), shows the progress its job
    reports, and writes its result; stops the tasks on a signal."""

    def __init__(self, ray, runs, todo, results, jobs, options, display, where, warn):
        from ray.util.queue import Queue

        self.ray, self.runs, self.pending, self.results = ray, runs, deque(todo), results
        self.jobs, self.display, self.where, self.warn = jobs, display, where, warn
        self.token = secrets.token_hex(8)  # this command's: in the lock file of every run it holds
        self.threads = options.threads or 1
        if options.data_dir is not None:  # as the driver sees it, like the runs directories
            options = dataclasses.replace(options, data_dir=Path(options.data_dir).resolve())
        self.options = options
        gpus = ray.cluster_resources().get("GPU", 0)
        self.task = ray.remote(num_cpus=self.threads, num_gpus=1 / RUNS_PER_GPU if gpus else 0,
                               max_retries=RETRIES, retry_exceptions=[JobLost])(_task)
        self.events = Queue()
        self.running: dict = {}  # object ref -> run index
        self.locks: dict[int, ExitStack] = {}  # run index -> its lock, held until its result is written
        self.attempts: dict[int, int] = {}  # run index -> tasks started for it (a retry is the second)
        self.said: set[str] = set()  # the warnings said once for the whole grid
        self.stopping: int | None = None  # the signal that asked us to stop
        self.cancel = False  # the tasks are to be cancelled (done here, not in the signal handler)
        self.force = False  # a second signal, or the stop took too long: end at once
        self.deadline: float | None = None

    def run(self) -> list:
        if self.display:
            at_once = self.jobs or max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.threads))
            epochs = sum(self.runs[i].config.epochs - (0 if self.options.force else epochs_kept(self.runs[i]))
                         for i in self.pending)
            self.display.start(len(self.pending), min(at_once, len(self.pending)), self.threads, self.where,
                               epochs=epochs)
        try:
            with signals_to(self._stop):
                self._submit()
                while self.running:
                    if self.deadline is not None and time.monotonic() > self.deadline:
                        self.force = True
                    if self.force:
                        break
                    if self.cancel:
                        self.cancel = False
                        for ref in self.running:  # each task stops its job, which keeps its finished epochs
                            self.ray.cancel(ref)
                    ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=0.2)
                    self._drain()
                    for ref in ready:
                        self._take(ref)
                    self._submit()
                self._drain()
        finally:
            for ref in self.running:  # Ray kills their workers; each job, its parent gone, stops
                self.ray.cancel(ref, force=True)
            for lock in self.locks.values():
                lock.close()
            if self.display:
                self.display.stop()
        if self.stopping is not None:
            raise stopped(self.results)
        return self.results

    def _stop(self, signum: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: every task is cancelled (its job keeps its finished epochs, which
        come back from a scratch directory too); a second one ends at once."""
        if self.stopping is not None:
            self.force = True
            return
        self.stopping = signum
        self.pending.clear()
        self.deadline = time.monotonic() + STOP_WAIT
        self.cancel = True

    def _submit(self) -> None:
        while self.pending and self.stopping is None and (self.jobs is None or len(self.running) < self.jobs):
            index = self.pending.popleft()
            spec = self.runs[index]
            lock = ExitStack()
            try:
                lock.enter_context(spec.run.locked(self.token))
            except RunLocked as e:  # another command trains it
                self.warn(f"{spec.label}: {e}")
                self._result(index, busy(spec, str(e)))
                continue
            done = self._finished(spec)
            if done is not None:  # another command trained it since this one began
                lock.close()
                self._result(index, done)
                continue
            self.locks[index] = lock
            # The path as the driver sees it: a worker's working directory is not the driver's. The
            # run's files go as a reference the task reads only if it cannot see them.
            there = dataclasses.replace(spec, runs_dir=Path(spec.runs_dir).resolve())
            seed = [self.ray.put(spec.run.files())]
            self.running[self.task.remote(index, there, self.options, self.threads, self.token, seed,
                                          self.events)] = index

    def _finished(self, spec: RunSpec):
        if self.options.force or spec.run.status(relevant(spec.config)) != "finished":
            return None
        from normtf.training import TrainResult

        try:
            return TrainResult(spec.run, relevant(spec.config), spec.run.read_history(), spec.run.read_metrics(),
                               reused=True)
        except CorruptFile:
            return None  # its job says so, and trains it again

    def _drain(self) -> None:
        count = self.events.qsize()
        for index, events in self.events.get_nowait_batch(count) if count else ():
            for event in events:
                self._handle(index, self.runs[index], event)

    def _handle(self, index: int, spec: RunSpec, event: dict) -> None:
        kind = event["event"]
        if kind == "task":  # a task started for the run: the first, or Ray's retry
            self.attempts[index] = self.attempts.get(index, 0) + 1
            if self.display and self.attempts[index] > 1:
                self.display.finished(index, spec.label, None)  # the lost one's line goes (if a lost worker left it)
        elif kind == "warn" and event.get("once"):
            if event["message"] not in self.said:
                self.said.add(event["message"])
                self.warn(event["message"])
        elif kind == "warn":
            self.warn(f"{spec.label}: {event['message']}")
        elif kind == "lost":
            if self.display:
                self.display.finished(index, spec.label, None)  # its line goes; a retry shows a new one
            if self.attempts.get(index, 0) <= RETRIES:
                self.warn(f"{spec.label}: {event['message']}; Ray runs it again")
        elif self.display:
            values = {"begin": (), "resume": ("kept", "epochs"), "step": ("epoch", "epochs", "step", "steps", "stats"),
                      "epoch": ("epoch", "epochs", "logs")}[kind]
            self.display.update(index, spec.label, kind, *(event[name] for name in values))

    def _take(self, ref) -> None:
        """A task's end: the run's files written back (if it trained elsewhere), its result, its lock
        released."""
        index = self.running.pop(ref)
        spec = self.runs[index]
        try:
            outcome = self._outcome(ref, spec)
            if outcome.get("files") is not None:
                spec.run.replace(outcome["files"])
            result = self._result_of(spec, outcome)
        finally:
            self.locks.pop(index).close()
        self._result(index, result)

    def _outcome(self, ref, spec: RunSpec) -> dict:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.TaskCancelledError:  # cancelled before it started, or force-cancelled
            return {"status": "interrupted"}
        except exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, JobLost):  # lost twice
                return {"status": "lost", "reason": cause.reason, "short": cause.short, "files": cause.files}
            return {"status": "error", "message": _last_line(cause or e)}
        except exceptions.RayError as e:  # the worker (or its node) died, and so did the retry's
            return {"status": "lost", "reason": f"its Ray worker was lost ({type(e).__name__})",
                    "short": "Ray worker lost"}

    def _result_of(self, spec: RunSpec, outcome: dict):
        from normtf.training import TrainResult

        status = outcome["status"]
        if status in ("finished", "failed"):
            values = outcome["result"]
            result = TrainResult(spec.run, relevant(spec.config), values["history"], values["metrics"],
                                 values["reused"])
            if outcome.get("gallery") is not None and spec.gallery is not None:
                atomic_write(spec.gallery, outcome["gallery"])
                result.gallery = spec.gallery
            return result
        if status == "busy":
            self.warn(f"{spec.label}: {outcome['message']}")
            return busy(spec, outcome["message"])
        if status == "error":
            self.warn(f"{spec.label}: {outcome['message']}")
            return failed(spec, outcome["message"], "an error (its line above)")
        if status == "lost":
            return failed(spec, f"{outcome['reason']}, and so was Ray's retry; its finished epochs are kept, and "
                                "the same command resumes it", f"lost twice ({outcome['short']})")
        if self.stopping is not None:  # interrupted by us: the closing line says what is kept
            return None
        return failed(spec, "its Ray task was cancelled, not by this command; its finished epochs are kept, and "
                            "the same command resumes it", "Ray task cancelled")

    def _result(self, index: int, result) -> None:
        self.results[index] = result
        if self.display:
            self.display.finished(index, self.runs[index].label, result)


def _reason(error) -> str:
    """Ray's message in one line: its first, and its last where the server sent a traceback (a Ray
    Client server puts its own error after one: "Initialization failure from server: ... RuntimeError:
    Proxy failed to Connect to backend! Check `ray_client_server.err` ...")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[1:][-1:]) or type(error).__name__


def _last_line(error) -> str:
    """A task's exception as `Type: message`: the last line of what Ray sends back (its traceback's end)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


# --- the task, in a Ray worker ---------------------------------------------------------------------

def _task(index: int, spec: RunSpec, options: Options, threads: int, token: str, seed: list, events) -> dict:
    """One run in a Ray worker, by a job (normtf.job): in place if this worker sees the driver's lock
    on it (the disk is shared), else in a scratch directory seeded with `seed[0]`'s files (a
    reference, read only then). Returns {"status": the job's ("finished", "failed", "busy", "error")
    or "interrupted" (cancelled), "result", "message", "files": the run's files if it trained in
    scratch, "gallery": the image's bytes if it drew one}; raises JobLost if the job ended without
    ending its run, unasked."""
    events.put((index, [{"event": "task"}]))
    stop: list[int] = []
    with signals_to(stop.append):  # in place of Ray's own handlers (SIGTERM: exit), for this task
        _remove_dead_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-"))
        job = None
        try:
            here, shared = spec, spec.run.held_for(token)
            if shared:
                options = dataclasses.replace(options, lock_token=token)
            else:
                import ray

                here = dataclasses.replace(spec, runs_dir=scratch / "runs")
                files = ray.get(seed[0])
                here.run.path.mkdir(parents=True)
                if files:
                    here.run.replace(files)
            if options.data_dir is not None and not Path(options.data_dir).is_dir():
                events.put((index, [{"event": "warn", "index": index, "once": True, "message": (
                    f"--data-dir {options.data_dir} is not on the Ray worker at {socket.gethostname()}: its runs "
                    "use the dataset from its own cache (~/.cache/normtf, fetched and checked by SHA-256 as "
                    "`normtf data` does)")}]))
                options = dataclasses.replace(options, data_dir=None)
            if spec.gallery is not None:  # drawn here, sent back, written where the driver wants it
                here = dataclasses.replace(here, gallery=scratch / spec.gallery.name)
            if stop:
                return {"status": "interrupted"}
            job = Job(options, threads, scratch=scratch)
            job.give(index, here)
            job.no_more()
            end, gallery = _relay(job, index, events, stop)
            files = None if shared else here.run.files()
            cancelled = signal.SIGINT in stop  # Ray's cancel; any other signal is someone else's
            if end is not None and end["status"] != "interrupted":
                return {"status": end["status"], "result": end.get("result"), "message": end.get("message"),
                        "files": files, "gallery": gallery.read_bytes() if gallery else None}
            if cancelled:
                return {"status": "interrupted", "files": files}
            epochs = f"after {epochs_kept(here)} of {spec.config.epochs} epochs"
            if end is None:
                how = job.how_it_ended()
                lost = JobLost(f"its process ended ({how}) {epochs}", f"process ended ({how.split(':')[0]})", files)
            else:
                signum = next(iter(stop), None) or end.get("signal")  # the worker's, else the job's
                name = signal.Signals(signum).name if signum else "its parent gone"
                whose = "its Ray worker" if stop else "its process"
                lost = JobLost(f"{whose} was stopped ({name}, not by this command) {epochs}",
                               f"{'worker' if stop else 'process'} stopped ({name})", files)
            events.put((index, [{"event": "lost", "index": index, "message": lost.reason}]))
            raise lost
        finally:
            if job is not None:
                job.signal(signal.SIGKILL)  # gone already, but for an error of ours
                job.wait()
                job.close()
            shutil.rmtree(scratch, ignore_errors=True)


def _relay(job: Job, index: int, events, stop: list) -> tuple[dict | None, Path | None]:
    """Relay the job's events to the driver until it exits; a stop (a signal to the task) is passed
    on to it once, and STOP_WAIT seconds later it is killed. Returns its "end" event (None if it died
    without one) and the gallery it drew."""
    end, gallery, deadline = None, None, None
    while True:
        if stop and deadline is None:
            job.signal(signal.SIGINT)
            deadline = time.monotonic() + STOP_WAIT
        if deadline is not None and time.monotonic() > deadline:
            job.signal(signal.SIGKILL)
        readable, _, _ = select.select([job], [], [], 0.25)  # short: a cancel does not wake select
        if not readable:
            continue
        got = job.read()
        if got is None:
            break
        relayed = []
        for event in got:
            if event["event"] == "end":
                end = event
            elif event["event"] == "gallery":
                gallery = Path(event["path"])
            elif event["index"] is not None:  # not "ready"
                relayed.append(event)
        if relayed:
            events.put((index, relayed))
    job.wait()
    return end, gallery


def _remove_dead_scratch() -> None:
    """The scratch directories of tasks whose worker was killed before its job started (the job
    removes its own otherwise): named with the worker's pid, removed once that process is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH}*"):
        pid = path.name[len(SCRATCH):].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
