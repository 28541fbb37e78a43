"""A run directory on disk: which files it holds, written whole or not at all, and its lock.

runs/<norm>/ (runs/<norm>/seed-<s>/ for multi-seed studies; runs/<dataset>/<norm>/ for a dataset
other than MNIST, so that two datasets' runs never share a directory) holds config.json, history.json,
history.csv, metrics.json, model.keras, and while a run is unfinished, checkpoint/ (the last
finished epoch's weights and optimizer state). A run trained elsewhere (a Ray worker that does not
share this disk: normtf.cluster) comes back as its files, which replace the run's whole or not at all.
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from normtf.config import TrainConfig
from normtf.errors import CorruptFile, NormtfError, RunLocked
from normtf.files import atomic_write, read_json, write_json
from normtf.norms import relevant

# A run's files being replaced (RunDir.replace): written into STAGING*, renamed to INCOMING once
# complete (from then on the new files win), the old ones moved into OUTGOING, the new ones in.
STAGING, INCOMING, OUTGOING = ".staging-", ".incoming", ".outgoing"
HISTORY_KEYS = ["epoch", "train_loss", "train_objective", "train_accuracy", "test_loss", "test_accuracy", "epoch_time"]


def history_keys(split: str = "test") -> list[str]:
    """The keys of an epoch record of a run measured on `split` (TrainConfig.evaluated_on): a run with
    a validation split records validation_loss and validation_accuracy where others record the test's."""
    return [key.replace("test", split) for key in HISTORY_KEYS]


def evaluated_on(records: list[dict]) -> str:
    """What a history's epochs were measured on: "validation" or "test"."""
    return "validation" if records and "validation_accuracy" in records[0] else "test"


def dataset_dir(directory: Path | str, dataset: str) -> Path:
    """Where a dataset's runs or figures go under `directory`: MNIST's (the default, and every run
    made before there was a choice) at the top, another dataset's in a subdirectory of its name."""
    return Path(directory) if dataset == TrainConfig().dataset else Path(directory) / dataset


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.history = self.path / "history.json"
        self.history_csv = self.path / "history.csv"
        self.metrics = self.path / "metrics.json"
        self.model = self.path / "model.keras"
        self.checkpoint_dir = self.path / "checkpoint"
        self.lock_file = self.path / ".lock"
        self.replaced_dir = self.path / "replaced"  # a finished run being replaced (--force), until the new one has an epoch

    @classmethod
    def for_config(cls, runs_dir: Path | str, config: TrainConfig, per_seed: bool = False) -> RunDir:
        """<runs-dir>/<norm>/, or <runs-dir>/<norm>/seed-<seed>/ when a study runs several seeds;
        under <runs-dir>/<dataset>/ for a dataset other than MNIST."""
        path = dataset_dir(runs_dir, config.dataset) / config.norm
        return cls(path / f"seed-{config.seed}" if per_seed else path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    def _results(self) -> list[Path]:
        return [self.history, self.history_csv, self.metrics, self.model, self.config]

    def set_aside(self) -> None:
        """Make room for a new run without losing the old one yet: its files move into replaced/
        (renames, so nothing is copied) until the new run has finished an epoch."""
        self.recover()
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        previous = [path for path in self._results() if path.exists()]
        if previous:
            self.replaced_dir.mkdir()
            for path in previous:
                path.rename(self.replaced_dir / path.name)

    def drop_replaced(self) -> None:
        """The new run has an epoch on disk: the run it replaces can go."""
        if self.replaced_dir.exists():
            shutil.rmtree(self.replaced_dir)

    def recover(self) -> bool:
        """If a run was set aside and its replacement never finished an epoch (it failed, was
        interrupted or killed), put the old run back. True if it did."""
        if not self.replaced_dir.exists():
            return False
        if self.history.exists():  # the replacement got as far as an epoch: it stays
            self.drop_replaced()
            return False
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        for path in self._results():
            path.unlink(missing_ok=True)
            if (self.replaced_dir / path.name).exists():
                (self.replaced_dir / path.name).rename(path)
        self.replaced_dir.rmdir()
        return True

    def checkpoint(self, epochs_done: int) -> Path:
        return self.checkpoint_dir / f"epoch-{epochs_done:04d}.weights.h5"

    def read_history(self) -> list[dict]:
        records = read_json(self.history) or []
        if not isinstance(records, list) or any(set(history_keys(evaluated_on(records))) - set(r) for r in records):
            raise CorruptFile(f"{self.history} does not hold a list of epoch records")
        return records

    def write_history(self, records: list[dict]) -> None:
        write_json(self.history, records)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=history_keys(evaluated_on(records)), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write(self.history_csv, out.getvalue())

    def read_metrics(self) -> dict | None:
        return read_json(self.metrics)

    def stored_config(self) -> TrainConfig | None:
        """The run's config, with the settings its variant does not use as None (older files
        recorded the reference defaults there), so it compares equal to a new run's."""
        values = read_json(self.config)
        return relevant(TrainConfig.from_dict(values["config"])) if values else None

    def status(self, config: TrainConfig | None = None) -> str:
        """'finished', 'failed', 'partial' (resumable), 'stale' (other config) or 'empty'."""
        try:
            stored = self.stored_config()
            metrics = self.read_metrics()
            if stored is None:
                return "empty"
            if config is not None and stored != relevant(config):
                return "stale"
            if metrics is not None:
                return metrics.get("status", "finished") if self.model.exists() or metrics.get("status") == "failed" else "partial"
            return "partial"
        except CorruptFile:
            return "partial"

    @contextmanager
    def locked(self, token: str | None = None):
        """Hold an exclusive lock on the run for the duration; a second process is refused, naming the
        holder's pid. `token` names the command that takes it: a process given the same token (that
        command's job on a Ray worker sharing this disk: normtf.cluster) trains the run under the lock
        its command holds, neither taking nor releasing it. The lock file goes when the lock is
        released, so finished runs hold only their results."""
        handle = self._acquire(token)
        if handle is None:  # held by the command that started this process, for it
            yield self
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {token}" if token else str(os.getpid()))
            handle.flush()
            self.finish_replacing()
            yield self
        finally:
            self.lock_file.unlink(missing_ok=True)  # while still held: nobody can be between open and lock on it
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            if not any(self.path.iterdir()):  # refused before anything was written: leave no trace
                self.path.rmdir()

    def _acquire(self, token: str | None):
        """The lock file's handle, locked; None if the command named by `token` holds the lock."""
        for _ in range(3):  # the holder may remove the file between our open and our lock: open it anew
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                handle = open(self.lock_file, "a+")
            except OSError as e:
                raise NormtfError(f"cannot write to {self.path}: {e.strerror}; choose a writable --runs-dir") from e
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder, *held_for = handle.read().split() or ["unknown"]
                handle.close()
                if token is not None and held_for == [token]:
                    return None
                raise RunLocked(f"another normtf process (pid {holder}) is training into {self.path}; "
                                  "wait for it to finish or use another --runs-dir") from None
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(self.lock_file).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()
        raise NormtfError(f"could not lock {self.path}: its lock file keeps changing; is another normtf running?")

    def held_for(self, token: str) -> bool:
        """Whether this process sees the run's lock file, naming the command `token` names (a Ray worker
        that sees it shares the driver's disk)."""
        try:
            return self.lock_file.read_text().split()[1:] == [token]
        except OSError:
            return False

    def _own(self, entry: Path) -> bool:
        """Whether `entry` (in the run directory) is part of the run, not its lock or a replacement's."""
        return entry.name != self.lock_file.name and not entry.name.startswith((STAGING, INCOMING, OUTGOING))

    def files(self) -> dict[str, bytes]:
        """Every file of the run ({path relative to the run: content}), for a process that cannot see
        this disk; the lock and a replacement under way are not the run's."""
        if not self.path.is_dir():
            return {}
        return {path.relative_to(self.path).as_posix(): path.read_bytes()
                for entry in self.path.iterdir() if self._own(entry)
                for path in ([entry] if entry.is_file() else sorted(entry.rglob("*"))) if path.is_file()}

    def replace(self, files: dict[str, bytes]) -> None:
        """Make the run's files exactly `files` (RunDir.files of the run trained elsewhere), whole or not
        at all, under the lock the caller holds: a run killed at any moment has its old files or the new
        ones, never a mix (a stale checkpoint/ beside a new model, metrics before their model). The new
        files are written into a staging directory in the run, which becomes INCOMING once complete;
        finish_replacing then swaps them in, by renames. The lock file stays, and with it the lock."""
        self.finish_replacing()
        staging = Path(tempfile.mkdtemp(dir=self.path, prefix=STAGING))
        try:
            for name, content in files.items():
                target = staging / name
                if Path(name).is_absolute() or ".." in Path(name).parts or not self._own(self.path / Path(name).parts[0]):
                    raise ValueError(f"not a file of a run: {name!r}")  # a bug of the caller
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(target, 0o644)
            staging.rename(self.path / INCOMING)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.finish_replacing()

    def finish_replacing(self) -> None:
        """Finish a replacement a process was killed in (call holding the lock; nothing to do if none
        was): once INCOMING exists the new files win, so the old ones still in place move out (into
        OUTGOING, complete once renamed from its partial name), the new ones move in, and what went out is
        removed. A staging directory never completed is dropped: the old files stay."""
        incoming, outgoing, partial = self.path / INCOMING, self.path / OUTGOING, self.path / (OUTGOING + "-partial")
        for staging in self.path.glob(STAGING + "*"):
            shutil.rmtree(staging, ignore_errors=True)
        if incoming.is_dir():
            if not outgoing.is_dir():  # the old files are not all out yet
                partial.mkdir(exist_ok=True)
                for entry in self.path.iterdir():
                    if self._own(entry):
                        entry.rename(partial / entry.name)
                partial.rename(outgoing)
            for entry in incoming.iterdir():
                entry.rename(self.path / entry.name)
            incoming.rmdir()
        for done in (outgoing, partial):
            shutil.rmtree(done, ignore_errors=True)


def summarize(records: list[dict]) -> dict:
    """Final and best test accuracy, epoch of best, mean epoch time, from the epoch records (of a run
    with a validation split: final and best validation accuracy)."""
    split = evaluated_on(records)
    best = max(records, key=lambda r: r[f"{split}_accuracy"])
    return {
        "epochs": len(records),
        f"final_{split}_accuracy": records[-1][f"{split}_accuracy"],
        f"final_{split}_loss": records[-1][f"{split}_loss"],
        f"best_{split}_accuracy": best[f"{split}_accuracy"],
        "best_epoch": best["epoch"],
        "mean_epoch_time": sum(r["epoch_time"] for r in records) / len(records),
    }


def is_finite(value) -> bool:
    return value is not None and math.isfinite(value)


def code_version() -> dict:
    """Which normtf made a run: its version and, run from a git checkout, the commit and whether
    tracked files had uncommitted changes (then the commit alone does not reproduce the run)."""
    import normtf

    record = {"version": normtf.__version__}
    root = Path(normtf.__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10)
            if commit.returncode == 0 and status.returncode == 0:
                record.update(commit=commit.stdout.strip(), uncommitted_changes=bool(status.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):  # no git on this machine: the version is what we know
            pass
    return record
