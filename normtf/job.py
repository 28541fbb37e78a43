"""One run of a grid, as the local pool (normtf.grid) and a Ray cluster (normtf.cluster) both take
it: its settings and where it goes (RunSpec), how every run of the grid trains (Options), and the result
of a run that ended without one of its own (failed: its process died; busy: another normtf process
holds it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from normtf.config import TrainConfig
from normtf.errors import Interrupted, NormtfError
from normtf.norms import relevant
from normtf.runs import RunDir

RUNS_PER_GPU = 4  # small models share a GPU (memory growth on); not measured: no GPU has run normtf


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its settings, where it goes, and what the display calls it."""
    config: TrainConfig
    runs_dir: Path
    per_seed: bool
    label: str

    @property
    def run(self) -> RunDir:
        return RunDir.for_config(self.runs_dir, self.config, self.per_seed)


@dataclass(frozen=True)
class Options:
    """How every run of a grid trains (the same for all, so it crosses to a worker once). threads
    and verbose are `normtf --threads` and `--verbose` (normtf.quiet), which the CLI sets; threads
    None shares the cores out among the jobs."""
    force: bool = False
    tensorboard: bool = False
    data_dir: Path | None = None
    threads: int | None = dataclasses.field(default_factory=lambda: _quiet().threads)
    verbose: bool = dataclasses.field(default_factory=lambda: _quiet().verbose)


def _quiet():
    from normtf import quiet

    return quiet


def failed(spec: RunSpec, reason: str):
    """The result of a run that ended without a result of its own (its process died, an error):
    marked failed for the summary; its finished epochs stay on disk for the next command to resume."""
    from normtf.training import TrainResult

    run = spec.run
    try:
        history = run.read_history()
    except NormtfError:
        history = []
    return TrainResult(run, relevant(spec.config), history, {"status": "failed", "norm": spec.config.norm,
                                                            "failure": {"reason": reason}})


def busy(spec: RunSpec, reason: str):
    """The result of a run another normtf process holds: it is that process's to train."""
    from normtf.training import TrainResult

    return TrainResult(spec.run, relevant(spec.config), [], {"status": "busy", "norm": spec.config.norm,
                                                           "reason": reason})


def stopped(results: list, where: str = "") -> Interrupted:
    """The one line a grid stopped by Ctrl-C or SIGTERM ends with: how many runs are finished, and
    that the same command resumes the rest (which keep their finished epochs `where`)."""
    done = sum(1 for r in results if r is not None and r.metrics.get("status") == "finished")
    return Interrupted(f"interrupted: {done} of {len(results)} runs are finished; the unfinished ones keep their "
                       f"finished epochs{where}; run the same command again to resume them")
