"""Where a command writes when no flag names the place, and the check that it can.

A user's toy run is not the repository's record: by default every file goes beside the runs,
under --runs-dir (runs/, which git ignores), so a command run from a clone never changes a tracked
file. The committed study (results/, img/) is rewritten only by a command that names those
directories (the README's and docs/results.md's reproduction commands do). Every place a command
will write is checked before its first run starts, and an unwritable one is exit code 1, whichever
command and flag it is (docs/how-it-works.md, "Where files go" and "Exit codes").
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from normtf.errors import NormtfError
from normtf.runs import dataset_dir

RUNS = Path("runs")  # --runs-dir's default; also where diagrams and bench write when not told


def figures_dir(img_dir: Path | None, runs_dir: Path | str, dataset: str) -> Path:
    """--img-dir, else <runs-dir>/img/; a dataset other than MNIST in a subdirectory of its name."""
    return dataset_dir(Path(runs_dir) / "img" if img_dir is None else img_dir, dataset)


def sweep_file(out: Path | None, runs_dir: Path | str, dataset: str) -> Path:
    """--out, else sweep.json beside the sweep's runs (in <runs-dir>/<dataset>/ for a dataset other than MNIST)."""
    return Path(out) if out is not None else dataset_dir(runs_dir, dataset) / "sweep.json"


def report_file(out: Path | None, runs_dir: Path | str) -> Path:
    """--out, else report.html beside the runs it shows."""
    return Path(out) if out is not None else Path(runs_dir) / "report.html"


def bench_file(out: Path | None, against: str) -> Path:
    """--out, else runs/bench.json (runs/bench-<against>.json for --against keras-…)."""
    if out is not None:
        return Path(out)
    return RUNS / ("bench.json" if against == "reference" else f"bench-{against}.json")


def writable(directory: Path | str, flag: str) -> Path:
    """Fail now, not after an hour of training, if files cannot be made in `directory`: one line
    naming the flag that chose it. Nothing is left behind (a command refused later, e.g. for
    --tensorboard without TensorBoard, must not leave an empty directory): a missing directory is
    judged by its nearest existing ancestor, which must be a directory that takes a file. The
    probe file's name is this process's own: two compares started together into one --img-dir
    (README) once shared one, and the second to remove it failed."""
    directory = Path(directory)
    nearest = next(p for p in [directory, *directory.parents] if p.exists())
    try:
        if not nearest.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(nearest))
        with tempfile.NamedTemporaryFile(dir=nearest, prefix=".normtf-write-test."):
            pass
    except OSError as e:
        raise NormtfError(f"cannot write to {directory}: {e.strerror}; choose a writable {flag}") from None
    return directory
