"""A grid's runs as tasks on a Ray cluster (`--cluster ADDRESS`; normtf.grid hands them over).

Ray because ML grids already run on it (Ray Tune's), it starts each task in a worker process of its
own (max_calls=1: TensorFlow's thread pools, seed and precision policy are per run), and it
schedules fractions of a GPU, which is what a 9,910-parameter model needs of one.

Each task trains one run with `threads` CPUs (normtf --threads; 1 by default, the most images per
core) and, where the cluster has GPUs, 1/RUNS_PER_GPU of one. Its result comes back to the driver's
--runs-dir whether or not the workers share that disk: a task that sees the driver's runs directory
(it finds the token the driver wrote there) trains in place, so an interrupted run resumes where it
stopped; one that does not trains in a scratch directory of its own and returns the run's files,
which the driver writes (an unfinished run then restarts on the next command). A task whose worker
dies is retried once by Ray (resuming from its last epoch on a shared disk); a second loss marks the
run failed and the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from normtf.errors import Interrupted, NormtfError, RunLocked, UsageError
from normtf.files import atomic_write
from normtf.job import RUNS_PER_GPU, Options, RunSpec, busy, failed, stopped
from normtf.training import TrainResult

CLIENT_SERVER_LOST = "Starting Ray client server failed"  # Ray's words for it (ray.util.client.server.proxier)
TOKEN = ".normtf-cluster-token"  # in each runs directory while a grid runs: proves a worker shares the disk


def _ray(address: str):
    if address == "local":  # a throwaway Ray serves this process only: on loopback, as Ray keeps it on macOS
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UsageError("--cluster needs Ray, which is not installed: pip install 'normtf[ray]' "
                         "(and the same on every node of the cluster)") from None
    return ray


def run(jobs: list[RunSpec], todo: list[int], results: list, address: str, workers: int | None,
        options: Options, display, warn) -> list:
    """Train jobs[i] for i in todo on the Ray cluster at `address` ("local": a throwaway Ray on this
    machine); fill `results` in place and return it. workers: at most that many tasks at once
    (None: as many as the cluster schedules)."""
    ray = _ray(address)
    _answers(address)
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
    tokens = {}
    try:
        from ray.util.queue import Queue

        for directory in {jobs[index].runs_dir for index in todo}:
            tokens[directory] = secrets.token_hex(8)
            atomic_write(Path(directory) / TOKEN, tokens[directory])
        threads = options.threads or 1
        if options.data_dir is not None:  # as the driver sees it, like the runs directories
            options = dataclasses.replace(options, data_dir=Path(options.data_dir).resolve())
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_cpus=threads, num_gpus=1 / RUNS_PER_GPU if gpus else 0, max_calls=1,
                          max_retries=1, retry_exceptions=False)(_task)
        events = Queue()
        where = f" on the Ray cluster at {address}" if address != "local" else " on a local Ray"
        return _Driver(ray, task, events, jobs, todo, results, workers, options, threads, tokens, display, where,
                       warn).run()
    finally:
        for directory in tokens:
            (Path(directory) / TOKEN).unlink(missing_ok=True)
        ray.shutdown()


def _unreachable(address: str, reason: str) -> NormtfError:
    return NormtfError(f"could not reach a Ray cluster at {address!r}: {reason}; start one with `ray start --head` "
                       "and pass its address (or auto on its head node), or use --cluster local")


def _answers(address: str) -> None:
    """Refuse at once an address where nothing listens: Ray would retry it for many minutes in silence
    (a GCS address: over 10 minutes, measured with Ray 2.60). "local" and "auto" are Ray's to find."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # not host:port; Ray says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise _unreachable(address, f"nothing answers at {host}:{port} ({e.strerror or type(e).__name__})") from None


class _Driver:
    """Submits the tasks (at most `workers` at once), shows their progress, takes their results."""

    def __init__(self, ray, task, events, jobs, todo, results, workers, options, threads, tokens, display, where,
                 warn):
        self.ray, self.task, self.events = ray, task, events
        self.jobs, self.pending, self.results = jobs, list(todo), results
        self.workers, self.options, self.threads, self.tokens = workers, options, threads, tokens
        self.display, self.where, self.warn = display, where, warn
        self.running: dict = {}  # object ref -> job index
        self.stopping = False

    def run(self) -> list:
        if self.display:
            at_once = self.workers or max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.threads))
            self.display.start(len(self.pending), min(at_once, len(self.pending)), self.threads, self.where)
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._submit()
            while self.running:
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=0.2)
                self._drain()
                for ref in ready:
                    self._take(ref)
                self._submit()
            self._drain()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.display:
                self.display.stop()
        if self.stopping:
            raise stopped(self.results, " where the workers share --runs-dir")
        return self.results

    def _stop(self, signum, frame):
        if not self.stopping:
            self.stopping = True
            self.pending.clear()
            for ref in self.running:  # Ray raises KeyboardInterrupt in the task: it keeps its finished epochs
                self.ray.cancel(ref)

    def _submit(self):
        while self.pending and not self.stopping and (self.workers is None or len(self.running) < self.workers):
            index = self.pending.pop(0)
            job = self.jobs[index]
            # The path as the driver sees it: a worker's working directory is not the driver's.
            there = dataclasses.replace(job, runs_dir=Path(job.runs_dir).resolve())
            token = (str(there.runs_dir / TOKEN), self.tokens[job.runs_dir])
            self.running[self.task.remote(index, there, self.options, self.threads, token, self.events)] = index

    def _drain(self):
        while not self.events.empty():
            kind, pid, index, *rest = self.events.get()
            job = self.jobs[index]
            if kind == "warn":
                self.warn(f"{job.label}: {rest[0]}")
            elif self.display:
                self.display.update(index, job.label, kind, *rest)

    def _take(self, ref):
        index = self.running.pop(ref)
        job = self.jobs[index]
        try:
            kind, *value = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            kind, value = "interrupted", []
        except self.ray.exceptions.RayTaskError as e:
            kind, value = ("interrupted", []) if self.stopping else ("error", [_last_line(e.cause or e)])
        except self.ray.exceptions.RayError as e:  # the worker (or its node) died, and so did the retry
            kind, value = "error", [f"its Ray worker was lost twice ({type(e).__name__})"]
        result = None
        if kind == "result":
            result = TrainResult(job.run, *_outcome(value[0]))
        elif kind == "files":
            result = _write_back(job, *value)
        elif kind == "locked":
            result = busy(job, value[0])
        elif kind == "error":
            self.warn(f"{job.label}: {value[0]}")
            result = failed(job, value[0])
        self.results[index] = result
        if self.display:
            self.display.finished(index, job.label, result)


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


def _outcome(result) -> tuple:
    return result.config, result.history, result.metrics


def _write_back(job: RunSpec, result, files: dict[str, bytes]):
    """A run trained where the driver's disk is not: its files, written into the driver's run directory."""
    run = job.run
    with run.locked():
        for name, content in files.items():
            atomic_write(run.path / name, content)
    return TrainResult(run, *_outcome(result))


def _task(index: int, job: RunSpec, options: Options, threads: int, token: tuple[str, str], events):
    """One run, in a Ray worker process of its own: ("result", TrainResult) when it trained in the
    driver's runs directory, ("files", TrainResult, {name: bytes}) when it could not see it,
    ("locked", message) or ("error", message)."""
    from normtf import quiet

    quiet.verbose, quiet.threads = options.verbose, threads
    quiet.start_tensorflow()
    from normtf import data
    from normtf.progress import Reporter
    from normtf.training import train

    pid = os.getpid()
    path, secret = token
    shared = Path(path).is_file() and Path(path).read_text() == secret
    runs_dir = job.runs_dir if shared else Path(tempfile.mkdtemp(prefix="normtf-run-"))
    events.put(("begin", pid, index, threads))
    try:
        result = train(job.config, runs_dir, dataset=lambda: data.load(job.config.dataset, options.data_dir),
                       callbacks=[Reporter(events, pid, index, os.getppid())], tensorboard=options.tensorboard,
                       force=options.force, per_seed=job.per_seed,
                       warn=lambda message: events.put(("warn", pid, index, message)))
    except RunLocked as e:
        return "locked", str(e)
    except (Interrupted, KeyboardInterrupt):
        return ("interrupted",)
    except NormtfError as e:
        return "error", str(e)
    if shared:
        return "result", result
    try:
        files = {p.relative_to(result.run.path).as_posix(): p.read_bytes() for p in result.run.path.rglob("*")
                 if p.is_file() and "checkpoint" not in p.relative_to(result.run.path).parts}
        return "files", result, files
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
