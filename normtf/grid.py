"""A grid of runs, side by side. The study (study.compare) and the sweep (sweep.run_sweep) say which
runs; training.train trains one; this module decides where they train and how many at once, shows
them while they do, and hands back their results in the order they were asked for.

A 9,910-parameter model cannot keep many cores (or a GPU) busy, so a grid trains faster as several
runs at once, each with a share of the machine, than as one run after another on all of it (on 2
cores: docs/speed.md). `--jobs N` trains N runs at once on this machine, each in a process of its
own (TensorFlow's thread pools, seed and precision policy are per process, so runs cannot disturb
each other) with cores / N threads; `--jobs 1` trains them one after another in this process, as
normtf always did. `--cluster ADDRESS` sends them to a Ray cluster instead (normtf.cluster).

Whatever the jobs, a run's numbers are its own: with --deterministic every run uses one thread per
pool (TensorFlow splits sums by thread count, so the thread count changes the last bits), and so
its history and weights are the same alone or beside others. A run whose process dies is reported
failed and the others go on; Ctrl-C stops every job and the same command resumes them all.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import signal
import traceback
from collections import deque
from contextlib import contextmanager

from normtf import data
from normtf.errors import Interrupted, NormtfError, RunLocked
from normtf.job import RUNS_PER_GPU, Options, RunSpec, busy, failed, stopped
from normtf.norms import relevant

JOB_MEMORY = 1.5 * 2**30  # a job's peak resident memory, rounded up (docs/speed.md, "A grid of runs")


def cores() -> int:
    """The cores this process may use (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory free for new processes, where the system says (Linux); else None."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parse_jobs(text: str | int) -> int | None:
    """--jobs: a whole number from 1 to MAX_JOBS, or auto (None)."""
    if str(text) == "auto":
        return None
    return int(text)


def jobs_at_once(requested: int | None, runs: int, threads: int | None = None, gpus: int = 0) -> int:
    """How many runs train at once. A number asked for is kept (never more than the runs). auto:
    one job per `threads` cores (one thread each by default: per core, single-thread runs train the
    most images per hour), at most RUNS_PER_GPU per GPU where there are GPUs, and no more than the
    free memory holds at JOB_MEMORY each."""
    if runs <= 1:
        return 1
    if requested is not None:
        return min(requested, runs)
    slots = max(1, cores() // (threads or 1))
    if gpus:
        slots = min(slots, gpus * RUNS_PER_GPU)
    memory = available_memory()
    if memory is not None:
        slots = min(slots, max(1, int(memory // JOB_MEMORY)))
    return max(1, min(slots, runs))


def threads_per_job(jobs: int, threads: int | None) -> int:
    return threads or max(1, cores() // jobs)


def run(runs: list[RunSpec], jobs: int | None = 1, cluster: str | None = None, options: Options = Options(),
        callbacks_for=lambda config: (), show: bool = False, warn=lambda message: None, dataset=None) -> list:
    """Train (or reuse) every run; results in the runs' order. jobs: how many at once (None:
    auto); 1 trains in this process, with `callbacks_for(config)`'s Keras callbacks. `show`: the
    progress on the terminal (a bar per epoch for one run at a time, progress.GridProgress for
    several). `dataset`: a dataset's images by name, for runs trained in this process (default:
    loaded once, when a run first needs them; a caller that needs them too passes loader())."""
    from normtf.progress import EpochProgress, GridProgress

    results: list = [None] * len(runs)
    dataset = dataset or loader(options.data_dir, warn)
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
    import tensorflow as tf

    count = jobs_at_once(jobs, len(todo), options.threads, len(tf.config.list_physical_devices("GPU")))
    if count == 1:
        for index in todo:
            spec = runs[index]
            callbacks = [*([EpochProgress(spec.label)] if show else []), *callbacks_for(spec.config)]
            results[index] = _train_here(spec, options, dataset, callbacks, warn)
        return results
    return _Pool(runs, todo, results, count, options, display, warn).run()


def loader(data_dir, warn):
    """The dataset of a name, loaded once, when a run first needs it."""
    return functools.cache(lambda name: data.load(name, data_dir, warn=warn))


def _train_here(job: RunSpec, options: Options, dataset, callbacks, warn):
    from normtf.training import train

    try:
        return train(job.config, job.runs_dir, dataset=lambda: dataset(job.config.dataset), callbacks=callbacks,
                     tensorboard=options.tensorboard, force=options.force, per_seed=job.per_seed, warn=warn)
    except RunLocked as e:
        warn(str(e))
        return busy(job, str(e))


# --- the local pool: a process per job -----------------------------------------------------------

class _Pool:
    """N worker processes (spawned: TensorFlow's state does not survive a fork), each training one
    run at a time, handed the next when it reports the last. Workers run in process groups of
    their own, so Ctrl-C reaches only this process, which passes it on once to each and waits for
    them to keep their finished epochs."""

    def __init__(self, jobs, todo, results, count, options, display, warn):
        self.jobs, self.pending, self.results = jobs, deque(todo), results
        self.count, self.options, self.display, self.warn = count, options, display, warn
        self.threads = threads_per_job(count, options.threads)
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.workers: list[_Worker] = []
        self.stopping = None  # the signal that asked us to stop

    def run(self) -> list:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
        for slot in range(self.count):
            self.workers.append(_Worker(self.context, self.events, self.threads, self.options,
                                        slot % gpus if gpus else None))
        if self.display:
            self.display.start(len(self.pending), self.count, self.threads)
        with _signals_to(self._stop):
            try:
                for worker in self.workers:
                    self._next(worker)
                while any(worker.current is not None for worker in self.workers):
                    try:
                        self._handle(self.events.get(timeout=0.2))
                    except queue.Empty:
                        self._reap()
            finally:
                for worker in self.workers:
                    worker.finish()
                if self.display:
                    self.display.stop()
        if self.stopping is not None:
            raise stopped(self.results)
        return self.results

    def _stop(self, signum):
        if self.stopping is None:
            self.stopping = signum
            self.pending.clear()
            for worker in self.workers:
                worker.signal(signal.SIGINT)

    def _next(self, worker: _Worker) -> None:
        if self.pending and self.stopping is None:
            if not worker.alive():
                worker.restart()
            index = self.pending.popleft()
            worker.give(index, self.jobs[index])
        else:
            worker.current = None

    def _handle(self, event) -> None:
        kind, pid, index, *rest = event
        worker = next((w for w in self.workers if w.pid == pid), None)
        job = self.jobs[index]
        if kind == "warn":
            self.warn(f"{job.label}: {rest[0]}")
            return
        if kind in ("begin", "epoch", "step"):
            if self.display:
                self.display.update(index, job.label, kind, *rest)
            return
        result = {"done": lambda: rest[0], "locked": lambda: busy(job, rest[0]),
                  "error": lambda: failed(job, rest[0]), "interrupted": lambda: None}[kind]()
        if kind in ("locked", "error"):
            self.warn(f"{job.label}: {rest[0]}")
        self.results[index] = result
        if self.display:
            self.display.finished(index, job.label, result)
        if worker is not None and worker.current == index:
            self._next(worker)

    def _reap(self) -> None:
        """A worker that died (killed, out of memory) while training: its run is failed, a new
        worker takes the next run."""
        for worker in self.workers:
            if worker.current is not None and not worker.alive():
                self._drain()  # its last words may still be in the queue
                if worker.current is not None and not worker.alive():
                    index = worker.current
                    how = worker.exit_description()
                    self.results[index] = None if self.stopping else failed(
                        self.jobs[index], f"its process ended ({how}) during training")
                    if self.results[index] is not None:
                        self.warn(f"{self.jobs[index].label}: its process ended ({how}); its finished epochs are "
                                  "kept, the same command resumes it")
                        if self.display:
                            self.display.finished(index, self.jobs[index].label, self.results[index])
                    self._next(worker)

    def _drain(self) -> None:
        while True:
            try:
                self._handle(self.events.get(timeout=0.05))
            except queue.Empty:
                return


class _Worker:
    def __init__(self, context, events, threads, options, gpu):
        self.context, self.events, self.threads, self.options, self.gpu = context, events, threads, options, gpu
        self.current = None
        self.restart()

    def restart(self) -> None:
        self.tasks = self.context.Queue()
        self.process = self.context.Process(target=_worker_main, daemon=True,
                                            args=(self.tasks, self.events, self.threads, self.options, self.gpu))
        self.process.start()
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def give(self, index: int, job: RunSpec) -> None:
        self.current = index
        self.tasks.put((index, job))

    def signal(self, signum) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def exit_description(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def finish(self) -> None:
        """Ask the worker to end and wait for it; one that does not end in time is killed."""
        if self.alive():
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                pass
            self.process.join(60)
            if self.alive():
                self.process.kill()
                self.process.join()


@contextmanager
def _signals_to(stop):
    """SIGINT and SIGTERM call stop(signum) instead of raising in whatever the pool was doing."""
    previous = {signum: signal.signal(signum, lambda signum, frame: stop(signum))
                for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _worker_main(tasks, events, threads: int, options: Options, gpu: int | None) -> None:
    """A worker process: TensorFlow started quietly with `threads` threads per pool, then one run
    after another as the pool hands them over, every event reported on `events`."""
    os.setpgrp()  # Ctrl-C in the terminal reaches the pool, which passes it on
    parent = os.getppid()
    pid = os.getpid()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    code = 0
    try:
        from normtf import quiet

        quiet.verbose, quiet.threads = options.verbose, threads
        quiet.start_tensorflow()
        from normtf.progress import Reporter
        from normtf.training import train

        dataset = loader(options.data_dir, lambda message: None)
        while True:
            item = tasks.get()
            if item is None:
                break
            index, job = item
            events.put(("begin", pid, index, threads))
            try:
                result = train(job.config, job.runs_dir, dataset=lambda: dataset(job.config.dataset),
                               callbacks=[Reporter(events, pid, index, parent)], tensorboard=options.tensorboard,
                               force=options.force, per_seed=job.per_seed,
                               warn=lambda message: events.put(("warn", pid, index, message)))
                events.put(("done", pid, index, result))
            except RunLocked as e:
                events.put(("locked", pid, index, str(e)))
            except (Interrupted, KeyboardInterrupt):
                events.put(("interrupted", pid, index))
                break
            except NormtfError as e:
                events.put(("error", pid, index, str(e)))
            except Exception as e:  # a bug: the run is failed with what went wrong, the grid goes on
                events.put(("error", pid, index, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))
    except KeyboardInterrupt:  # stopped while waiting for a run
        pass
    except BaseException:  # TensorFlow could not start: the pool reports the run this worker held
        traceback.print_exc()
        code = 1
    finally:  # the events reach the pool, then the process ends without TensorFlow's teardown (~2 s)
        events.close()
        events.join_thread()
        os._exit(code)
