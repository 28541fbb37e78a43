"""A job: one process that trains a grid's runs one after another, the way `normtf train` trains one.

A grid (normtf.grid) trains `--jobs N` runs at once, each in a job of its own: a fresh Python
(`python -m normtf.job`, not a fork: TensorFlow's thread pools, seed and precision policy are per
process) in a process session of its own, so that a terminal's Ctrl-C or hang-up reaches only the
command, which passes it on. A Ray task (normtf.cluster) runs the same job for its one run. A job
trains each run with training.train, as `normtf train` does: the same lock, resume, interrupt
handling and files. What passes between a job and its parent is plain lines of JSON on two pipes
of its own:

- runs in, on the job's stdin: {"index": i, "spec": RunSpec} per run; end of input: no more runs.
- events out, on the descriptor the command line names: {"event": ..., "index": i, ...}, one line
  each: "begin", "resume" (epochs kept from before), "step" (at most every REPORT_EVERY seconds),
  "epoch", "warn", "gallery" (the run's misclassified images drawn), and "end" with the run's
  outcome: "finished" or "failed" (with the run's result), "busy" (another process holds its lock),
  "error" (what went wrong, in one line) or "interrupted" (a signal; the job then exits 130).

A job ends when its input ends, when it is interrupted (SIGINT, SIGTERM, SIGHUP: the run keeps its
finished epochs), and when its parent is gone: Linux sends it SIGTERM then (PR_SET_PDEATHSIG), and
elsewhere each run checks its parent between steps. So a command killed with SIGKILL leaves no job
behind, whether the job trains or waits. A job given a scratch directory of its own (a Ray task's,
where it trains a run the worker cannot see in place) removes it if it outlives its parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from normtf.config import TrainConfig
from normtf.errors import STOP_SIGNALS, Interrupted, NormtfError, RunLocked
from normtf.norms import relevant
from normtf.runs import RunDir

RUNS_PER_GPU = 4  # small models share a GPU (memory growth on); not measured: no GPU has run normtf
INTERRUPTED = 130  # a job's exit code after a signal, as `normtf train`'s
STOP_WAIT = 60  # seconds a stopped job has to keep its epochs and exit, before it is killed


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its settings, where it goes, what the display calls it, and where its
    gallery of misclassified test images goes once it is trained (None: not drawn by the job)."""
    config: TrainConfig
    runs_dir: Path
    per_seed: bool
    label: str
    gallery: Path | None = None

    @property
    def run(self) -> RunDir:
        return RunDir.for_config(self.runs_dir, self.config, self.per_seed)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "runs_dir": str(self.runs_dir), "per_seed": self.per_seed,
                "label": self.label, "gallery": None if self.gallery is None else str(self.gallery)}

    @classmethod
    def from_dict(cls, values: dict) -> RunSpec:
        return cls(TrainConfig.from_dict(values["config"]), Path(values["runs_dir"]), values["per_seed"],
                   values["label"], None if values.get("gallery") is None else Path(values["gallery"]))


@dataclass(frozen=True)
class Options:
    """How every run of a grid trains (the same for all, so it crosses to a job once). threads
    and verbose are `normtf --threads` and `--verbose` (normtf.quiet), which the CLI sets; threads
    None shares the cores out among the jobs. lock_token: a run locked under it is the job's to
    train (its command, on Ray, holds each run's lock while a task trains it: RunDir.locked)."""
    force: bool = False
    tensorboard: bool = False
    data_dir: Path | None = None
    lock_token: str | None = None
    threads: int | None = dataclasses.field(default_factory=lambda: _quiet().threads)
    verbose: bool = dataclasses.field(default_factory=lambda: _quiet().verbose)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "data_dir": None if self.data_dir is None else str(self.data_dir)}

    @classmethod
    def from_dict(cls, values: dict) -> Options:
        return cls(**{**values, "data_dir": None if values.get("data_dir") is None else Path(values["data_dir"])})


def _quiet():
    from normtf import quiet

    return quiet


def failed(spec: RunSpec, reason: str, short: str | None = None):
    """The result of a run that ended without a result of its own (its process died, an error):
    marked failed for the summary (`short`: the few words a table has room for); its finished epochs
    stay on disk for the next command to resume."""
    from normtf.training import TrainResult

    run = spec.run
    try:
        history = run.read_history()
    except NormtfError:
        history = []
    return TrainResult(run, relevant(spec.config), history, {"status": "failed", "norm": spec.config.norm,
                                                             "failure": {"reason": reason, "short": short or reason}})


def busy(spec: RunSpec, reason: str):
    """The result of a run another normtf process holds: it is that process's to train."""
    from normtf.training import TrainResult

    return TrainResult(spec.run, relevant(spec.config), [], {"status": "busy", "norm": spec.config.norm,
                                                             "reason": reason})


def stopped(results: list, where: str = "") -> Interrupted:
    """The one line a grid stopped by Ctrl-C, SIGTERM or SIGHUP ends with: how many runs are finished,
    and that the same command resumes the rest (which keep their finished epochs `where`)."""
    done = sum(1 for r in results if r is not None and r.metrics.get("status") == "finished")
    return Interrupted(f"interrupted: {done} of {len(results)} runs are finished; the unfinished ones keep their "
                       f"finished epochs{where}; run the same command again to resume them")


def epochs_kept(spec: RunSpec) -> int:
    """How many of the run's epochs are on disk (0 if none or unreadable)."""
    try:
        return len(spec.run.read_history())
    except NormtfError:
        return 0


def result_to_dict(result) -> dict:
    return {"run": str(result.run.path), "config": result.config.to_dict(), "history": result.history,
            "metrics": result.metrics, "reused": result.reused}


def result_from_dict(values: dict):
    from normtf.training import TrainResult

    return TrainResult(RunDir(Path(values["run"])), TrainConfig.from_dict(values["config"]), values["history"],
                       values["metrics"], values["reused"])


# --- the parent's side: a job process, started and spoken to -----------------------------------------

class Job:
    """A job process, as its parent (the local pool, a Ray task) sees it: started in a session of its
    own with its own pipes, handed runs, read for events, signalled, waited for."""

    def __init__(self, options: Options, threads: int, env: dict | None = None, scratch: Path | None = None):
        """`scratch`: a directory that is the job's own, which it removes if its parent dies first."""
        events_read, events_write = os.pipe()
        self.log = tempfile.TemporaryFile(mode="w+b")  # its stdout and stderr: the end is shown if it dies
        command = [sys.executable, "-m", "normtf.job", "--events-fd", str(events_write), "--threads", str(threads),
                   "--parent", str(os.getpid()), "--options", json.dumps(options.to_dict()),
                   *(["--scratch", str(scratch)] if scratch is not None else [])]
        output = None if options.verbose else self.log
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=output, stderr=output,
                                        pass_fds=(events_write,), start_new_session=True,
                                        env={**os.environ, **(env or {})})
        os.close(events_write)
        self.events = os.fdopen(events_read, "rb", buffering=0)
        self.pid = self.process.pid
        self.current: int | None = None  # the index of the run it trains
        self.buffer = b""
        self.signalled: int | None = None  # the signal its parent sent it, if any
        self.gallery: Path | None = None  # the gallery it drew of its current run

    def fileno(self) -> int:
        return self.events.fileno()

    def give(self, index: int, spec: RunSpec) -> None:
        self.current = index
        self.process.stdin.write((json.dumps({"index": index, "spec": spec.to_dict()}) + "\n").encode())
        self.process.stdin.flush()

    def no_more(self) -> None:
        """End of its input: it exits once its run (if any) has ended."""
        try:
            self.process.stdin.close()
        except OSError:  # it is gone already
            pass

    def read(self) -> list[dict] | None:
        """The events that have arrived (call when its descriptor is readable); None at its end
        (the job exited, or closed the pipe)."""
        chunk = os.read(self.events.fileno(), 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.signalled = self.signalled or signum
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.no_more()
        self.events.close()
        self.log.close()

    def how_it_ended(self) -> str:
        """Its exit in words, with the last line it wrote where it wrote one ("killed by SIGKILL")."""
        code = self.process.poll()
        said = ""
        if not self.log.closed:
            self.log.seek(0)
            lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
            said = f": {lines[-1][:200]}" if lines else ""
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}{said}"
        return f"exit code {code}{said}"



@contextmanager
def signals_to(stop):
    """In a job's parent (the local pool, a Ray task, a Ray grid's driver): Ctrl-C, SIGTERM and SIGHUP
    call stop(signum), which passes the stop on, instead of raising in whatever the parent was doing
    (a signal the process was started ignoring stays ignored)."""
    previous = {signum: signal.signal(signum, lambda signum, frame: stop(signum))
                for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- the job's side -------------------------------------------------------------------------------

class _Events:
    """The job's events pipe: one JSON line per event. A parent that is gone (EPIPE) stops the job."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, event: str, index: int | None = None, **values) -> None:
        line = (json.dumps({"event": event, "index": index, **values}, default=_jsonable) + "\n").encode()
        try:
            os.write(self.fd, line)
        except BrokenPipeError:
            raise KeyboardInterrupt from None  # the parent is gone: stop as if interrupted


def _jsonable(value):
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM when the parent dies (set here, not in the fork: the parent has threads). If it
    died before this line, there is no one to report to: stop as if interrupted."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise KeyboardInterrupt


def _serve(events: _Events, threads: int, options: Options, parent: int) -> int:
    """Train each run that comes on stdin; the exit code: 0 at the end of input, INTERRUPTED after a signal."""
    from normtf import quiet

    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # several jobs share a GPU: none takes all of it
    quiet.verbose, quiet.threads = options.verbose, threads
    quiet.start_tensorflow()
    from normtf.data import loader
    from normtf.progress import Reporter
    from normtf.training import train

    dataset = loader(options.data_dir)
    events.send("ready")
    for line in sys.stdin:
        item = json.loads(line)
        index, spec = item["index"], RunSpec.from_dict(item["spec"])
        events.send("begin", index, threads=threads)
        try:
            result = train(spec.config, spec.runs_dir, dataset=lambda: dataset(spec.config.dataset),
                           callbacks=[Reporter(events.send, index, parent)], tensorboard=options.tensorboard,
                           force=options.force, per_seed=spec.per_seed,
                           warn=lambda message: events.send("warn", index, message=message),
                           lock_token=options.lock_token)
        except RunLocked as e:
            events.send("end", index, status="busy", message=str(e))
            continue
        except (Interrupted, KeyboardInterrupt) as e:
            events.send("end", index, status="interrupted", signal=getattr(e, "signum", None), epochs=epochs_kept(spec))
            return INTERRUPTED
        except NormtfError as e:
            events.send("end", index, status="error", message=str(e))
            continue
        except Exception as e:  # a bug: the run is failed with what went wrong, the grid goes on
            text = str(e).strip()
            events.send("end", index, status="error", message=f"{type(e).__name__}: {text.splitlines()[0] if text else ''}")
            continue
        if spec.gallery is not None and result.metrics.get("status") == "finished" and not result.reused:
            from normtf.gallery import draw_gallery

            path = draw_gallery(result, dataset(spec.config.dataset), spec.gallery)
            events.send("gallery", index, path=str(path))
        events.send("end", index, status=result.metrics.get("status", "finished"), result=result_to_dict(result))
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m normtf.job --events-fd FD --threads N --parent PID --options JSON [--scratch DIR]`: a job
    (above)."""
    import argparse

    interrupts = []

    def on_signal(signum, frame):  # first of all: a signal during start-up ends the job quietly
        interrupts.append(signum)
        raise KeyboardInterrupt
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    if hasattr(signal, "pthread_sigmask"):  # taken whatever the parent blocked: a Ray worker blocks SIGINT
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # in its main thread, and children inherit it
    code, args = INTERRUPTED, None
    try:
        parser = argparse.ArgumentParser(prog="python -m normtf.job")
        parser.add_argument("--events-fd", type=int, required=True)
        parser.add_argument("--threads", type=int, required=True)
        parser.add_argument("--parent", type=int, required=True)
        parser.add_argument("--options", required=True)
        parser.add_argument("--scratch")
        args = parser.parse_args(argv)
        _die_with_parent(args.parent)
        code = _serve(_Events(args.events_fd), args.threads, Options.from_dict(json.loads(args.options)), args.parent)
    except KeyboardInterrupt:
        code = INTERRUPTED
    except BaseException:  # TensorFlow could not start, a bug: the parent shows the end of this
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        if args is not None and args.scratch and os.getppid() != args.parent:  # no one else will remove it
            import shutil

            shutil.rmtree(args.scratch, ignore_errors=True)
        # Without TensorFlow's teardown (1.5-2.5 s), and without a word: the parent says what happened.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    main()
