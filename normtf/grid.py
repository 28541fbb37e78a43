"""A grid of runs, side by side. The study (study.compare) and the sweep (sweep.run_sweep) say which
runs; training.train trains one; this module decides where they train and how many at once, shows
them while they do, and hands back their results in the order they were asked for.

A 9,910-parameter model cannot keep many cores (or a GPU) busy, so a grid trains faster as several
runs at once, each with a share of the machine, than as one run after another on all of it (on 2
cores: docs/speed.md). `--jobs N` trains N runs at once on this machine, each in a job (normtf.job:
a process of its own that trains runs one after another, as `normtf train` does) with cores / N
threads; `--jobs 1`, or a single run left, trains in this process, as `normtf train` does.
`--cluster ADDRESS` sends the runs to a Ray cluster instead, where each Ray task runs the same job
(normtf.cluster).

Whatever the jobs, a run's numbers are its own: with --deterministic every run uses one thread per
pool (TensorFlow splits sums by thread count, so the thread count changes the last bits), and so
its history and weights are the same alone or beside others. Every run goes the way one `normtf
train` goes: its lock, its resume, its finished epochs kept on an interruption. A job that ends
without ending its run (killed, out of memory, stopped by a signal this command did not send) fails
that run, which the same command resumes, and the others go on. Ctrl-C, SIGTERM or SIGHUP stops
every job (a second one at once) and the same command resumes them all.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from collections import deque
from pathlib import Path

from normtf import data, machine
from normtf.errors import RunLocked
from normtf.job import (RUNS_PER_GPU, STOP_WAIT, Job, Options, RunSpec, busy, epochs_kept, failed,
                        result_from_dict, signals_to, stopped)
from normtf.norms import get_norm, relevant

JOB_MEMORY = 1.5 * 2**30  # a job's peak resident memory, rounded up (docs/speed.md, "A grid of runs")


def parse_jobs(text: str | int) -> int | None:
    """--jobs: a whole number from 1 to MAX_JOBS, or auto (None)."""
    if str(text) == "auto":
        return None
    return int(text)


def jobs_at_once(requested: int | None, runs: int, threads: int | None = None, gpus: int = 0) -> int:
    """How many runs train at once. A number asked for is kept (never more than the runs). auto:
    one job per `threads` cores (one thread each by default: per core, single-thread runs train the
    most images per hour; machine.cores: a container's CPU quota too), at most RUNS_PER_GPU per GPU
    where there are GPUs, and no more than the available memory holds at JOB_MEMORY each
    (machine.available_memory: a container's memory limit too)."""
    if runs <= 1:
        return 1
    if requested is not None:
        return min(requested, runs)
    slots = max(1, machine.cores() // (threads or 1))
    if gpus:
        slots = min(slots, gpus * RUNS_PER_GPU)
    memory = machine.available_memory()
    if memory is not None:
        slots = min(slots, max(1, int(memory // JOB_MEMORY)))
    return max(1, min(slots, runs))


def threads_per_job(jobs: int, threads: int | None) -> int:
    return threads or max(1, machine.cores() // jobs)


def run(runs: list[RunSpec], jobs: int | None = 1, cluster: str | None = None, options: Options = Options(),
        callbacks_for=lambda config: (), show: bool = False, warn=lambda message: None, dataset=None) -> list:
    """Train (or reuse) every run; results in the runs' order. jobs: how many at once (None:
    auto); 1 trains in this process, with `callbacks_for(config)`'s Keras callbacks. `show`: the
    progress on the terminal (a bar per epoch for one run at a time, progress.GridProgress for
    several). `dataset`: a dataset's images by name, for runs trained in this process (default:
    loaded once, when a run first needs them; a caller that needs them too passes data.loader())."""
    from normtf.progress import EpochProgress, GridProgress

    results: list = [None] * len(runs)
    dataset = dataset or data.loader(options.data_dir, warn)
    todo = []
    for index, spec in enumerate(runs):  # finished runs are reused here, without starting a job
        if not options.force and spec.run.status(relevant(spec.config)) == "finished":
            results[index] = _train_here(spec, options, dataset, (), warn)
        else:
            todo.append(index)
    if not todo:
        return results
    display = GridProgress() if show else None
    if cluster is not None:
        from normtf import cluster as ray_cluster

        return ray_cluster.run(runs, todo, results, cluster, jobs, options, display, warn)
    gpus = gpu_count()
    count = jobs_at_once(jobs, len(todo), options.threads, gpus)
    if count == 1:
        for index in todo:
            spec = runs[index]
            callbacks = [*([EpochProgress(spec.label)] if show else []), *callbacks_for(spec.config)]
            results[index] = _train_here(spec, options, dataset, callbacks, warn)
        return results
    return _Pool(runs, todo, results, count, gpus, options, display, warn).run()


def length(spec: RunSpec) -> float:
    """A run's expected training time, in batch norm's steps: its steps times its variant's cost."""
    config = spec.config
    images = config.train_size or 60_000  # both datasets' training sets
    return config.epochs * -(-images // config.batch_size) * get_norm(config.norm).cost


def gpu_count() -> int:
    """The GPUs TensorFlow sees in this process."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def _train_here(spec: RunSpec, options: Options, dataset, callbacks, warn):
    """One run in this process, as `normtf train` trains it; then its gallery, where asked for."""
    from normtf.training import train

    try:
        result = train(spec.config, spec.runs_dir, dataset=lambda: dataset(spec.config.dataset), callbacks=callbacks,
                       tensorboard=options.tensorboard, force=options.force, per_seed=spec.per_seed, warn=warn)
    except RunLocked as e:
        warn(str(e))
        return busy(spec, str(e))
    if spec.gallery is not None and result.metrics.get("status") == "finished" and not result.reused:
        from normtf.gallery import draw_gallery

        result.gallery = draw_gallery(result, dataset(spec.config.dataset), spec.gallery)
    return result


# --- the local pool: a job process per slot --------------------------------------------------------

class _Pool:
    """`count` jobs (normtf.job), each training one run at a time and handed the next when it ends
    its last. Each job has its own pipes, so one that dies takes nothing of the others with it, and
    its death is seen at once (the end of its events pipe, then its exit code). Jobs run in process
    sessions of their own, so Ctrl-C or a hang-up of the terminal reaches only this process, which
    passes it on once to each job and waits for them to keep their finished epochs; a second one
    kills them at once."""

    def __init__(self, runs, todo, results, count, gpus, options, display, warn):
        # The longest runs first: the last ones then end close together, instead of one long run
        # training alone at the end while the other jobs have nothing left.
        self.runs, self.pending, self.results = runs, deque(sorted(todo, key=lambda i: -length(runs[i]))), results
        self.count, self.gpus, self.options, self.display, self.warn = count, gpus, options, display, warn
        self.threads = threads_per_job(count, options.threads)
        self.jobs: dict[int, Job] = {}  # slot -> its job
        self.selector = selectors.DefaultSelector()
        self.stopping: int | None = None  # the signal that asked us to stop
        self.deadline = None

    def run(self) -> list:
        if self.display:
            epochs = sum(self.runs[i].config.epochs - (0 if self.options.force else epochs_kept(self.runs[i]))
                         for i in self.pending)
            self.display.start(len(self.pending), self.count, self.threads, epochs=epochs)
        with signals_to(self._stop):
            try:
                for slot in range(self.count):
                    self._start(slot)
                while self.jobs:
                    for key, _ in self.selector.select(timeout=1.0):
                        self._read(key.data)
                    if self.deadline is not None and time.monotonic() > self.deadline:
                        self._kill()
            finally:
                self._kill()
                if self.display:
                    self.display.stop()
        if self.stopping is not None:
            raise stopped(self.results)
        return self.results

    def _start(self, slot: int) -> None:
        """A new job in `slot`, given the next run at once (it reads it once TensorFlow has started)."""
        if not self.pending or self.stopping is not None:
            return
        device = machine.device_for_slot(slot, os.environ, self.gpus)
        job = Job(self.options, self.threads, {} if device is None else {"CUDA_VISIBLE_DEVICES": device})
        self.jobs[slot] = job
        self.selector.register(job, selectors.EVENT_READ, slot)
        self._next(job)

    def _next(self, job: Job) -> None:
        if self.pending and self.stopping is None:
            index = self.pending.popleft()
            try:
                job.give(index, self.runs[index])
            except OSError:  # it died already: its end is read next, and a new job takes this run
                self.pending.appendleft(index)
                job.current = None
        else:
            job.current = None
            job.no_more()

    def _read(self, slot: int) -> None:
        job = self.jobs[slot]
        events = job.read()
        if events is None:
            self._ended(slot)
            return
        for event in events:
            self._handle(job, event)

    def _handle(self, job: Job, event: dict) -> None:
        kind, index = event["event"], event["index"]
        if index is None:  # "ready": TensorFlow has started
            return
        spec = self.runs[index]
        if kind == "warn":
            self.warn(f"{spec.label}: {event['message']}")
        elif kind == "gallery":
            job.gallery = Path(event["path"])
        elif kind == "end":
            self._end(job, index, spec, event)
        elif self.display:
            values = {"begin": (), "resume": ("kept", "epochs"), "step": ("epoch", "epochs", "step", "steps", "stats"),
                      "epoch": ("epoch", "epochs", "logs")}[kind]
            self.display.update(index, spec.label, kind, *(event[name] for name in values))

    def _end(self, job: Job, index: int, spec: RunSpec, event: dict) -> None:
        status = event["status"]
        if status in ("finished", "failed"):
            result = result_from_dict(event["result"])
            result.gallery, job.gallery = job.gallery, None
        elif status == "busy":
            self.warn(f"{spec.label}: {event['message']}")
            result = busy(spec, event["message"])
        elif status == "error":
            result = failed(spec, event["message"], "an error (its line above)")
        else:  # interrupted: by us (the closing line says what is kept), or by a signal from elsewhere
            result = None if self.stopping is not None else self._lost(spec, event)
        self._result(index, result)
        if status == "interrupted":
            job.current = None  # it exits now; a new job takes the next run when its end is read
        else:
            self._next(job)

    def _lost(self, spec: RunSpec, event: dict):
        """A run whose job was stopped by a signal this command did not send (`kill PID`)."""
        signum = event.get("signal")
        name = signal.Signals(signum).name if signum else "its parent gone"
        return failed(spec, f"its process was stopped ({name}, not by this command) after {event['epochs']} of "
                            f"{spec.config.epochs} epochs; they are kept, and the same command resumes it",
                      f"process stopped ({name})")

    def _result(self, index: int, result) -> None:
        """A run's end: its result (None: interrupted by us), and its line (a failure's reason)."""
        self.results[index] = result
        if self.display:
            self.display.finished(index, self.runs[index].label, result)

    def _ended(self, slot: int) -> None:
        """Job `slot` has exited: a run it held without ending it failed (unless we stopped it); a new
        job takes the next run."""
        job = self.jobs.pop(slot)
        self.selector.unregister(job)
        job.wait()
        if job.current is not None:
            spec, how = self.runs[job.current], job.how_it_ended()
            self._result(job.current, None if self.stopping is not None else failed(
                spec, f"its process ended ({how}) during training; its finished epochs are kept, and the same "
                      "command resumes it", f"process ended ({how.split(':')[0]})"))
        job.close()
        self._start(slot)

    def _stop(self, signum: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: every job is asked to stop (each keeps its finished epochs); a
        second one kills them at once."""
        if self.stopping is not None:
            self.deadline = 0
            return
        self.stopping = signum
        self.pending.clear()
        self.deadline = time.monotonic() + STOP_WAIT
        for job in self.jobs.values():
            job.signal(signal.SIGINT)

    def _kill(self) -> None:
        for slot in list(self.jobs):
            job = self.jobs.pop(slot)
            job.signal(signal.SIGKILL)
            job.wait()
            self.selector.unregister(job)
            job.close()
