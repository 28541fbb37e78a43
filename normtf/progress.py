"""Live progress during training: a bar per epoch and a line per finished epoch for one run at a time;
for a grid of runs side by side, a line per running run and a bar for the grid, and the reports its
worker processes send (normtf.grid). Where the output is not a terminal (console.live_display), only
the lines."""

from __future__ import annotations

import os
import time

import keras
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from normtf.console import console, live_display, percent

REPORT_EVERY = 0.25  # seconds between a grid worker's progress reports


def _measured_on(logs: dict) -> str:
    """What Keras's val_ logs of an epoch measured: a run with a validation split names it in the logs
    (training._EpochKeeper); every other run's are the test set's."""
    return "validation" if "validation_accuracy" in logs else "test"


class EpochProgress(keras.callbacks.Callback):
    """A progress bar per epoch with live loss and accuracy (on a terminal), then one line per
    finished epoch."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True) if live_display() else None
        self.task = None

    def on_train_begin(self, logs=None):
        from normtf.models import trainable_params

        console.print(f"{self.label}: {trainable_params(self.model):,} trainable parameters, "
                      f"{self.params['steps']:,} steps an epoch", highlight=False)
        if self.progress:
            self.progress.start()

    def on_train_end(self, logs=None):
        if self.progress:
            self.progress.stop()

    def on_epoch_begin(self, epoch, logs=None):
        if self.progress:
            self.task = self.progress.add_task(f"{self.label} epoch {epoch + 1}/{self.params['epochs']}",
                                               total=self.params["steps"], stats="")

    def on_train_batch_end(self, batch, logs=None):
        if self.progress:
            logs = logs or {}
            self.progress.update(self.task, completed=batch + 1, stats=f"loss {float(logs.get('ce', 0)):.4f} "
                                                                       f"acc {percent(float(logs.get('accuracy', 0)))}")

    def on_test_begin(self, logs=None):
        if self.progress:
            self.progress.update(self.task, stats="evaluating")

    def on_epoch_end(self, epoch, logs=None):
        if self.progress:
            self.progress.remove_task(self.task)
        if logs and "val_accuracy" in logs:
            console.print(
                f"{self.label} epoch {epoch + 1:>2}/{self.params['epochs']}  "
                f"train loss {logs['ce']:.4f} acc {percent(logs['accuracy'])}   "
                f"{_measured_on(logs)} loss {logs['val_ce']:.4f} acc {percent(logs['val_accuracy'])}",
                highlight=False)


class GridProgress:
    """Several runs at once (normtf.grid): one live line per running run (its epoch, step, loss and
    accuracy so far), one bar for the whole grid, and a line per finished epoch and run above them.
    Where the output is not a terminal (a log file), only the lines."""

    def __init__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console,
                                 transient=True, disable=not live_display())
        self.tasks: dict[int, int] = {}

    def _say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, soft_wrap=True)

    def start(self, runs: int, jobs: int, threads: int, where: str = "") -> None:
        self._say(f"training {runs:,} run{'s' if runs != 1 else ''}, {jobs} at a time{where}, "
                  f"{threads} thread{'s' if threads != 1 else ''} each")
        self.grid = self.progress.add_task("all runs", total=runs, stats="")
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, index: int, label: str, kind: str, *values) -> None:
        if kind == "begin":
            self.tasks[index] = self.progress.add_task(label, total=None, stats="starting")
        elif kind == "step" and index in self.tasks:
            epoch, epochs, step, steps, stats = values
            self.progress.update(self.tasks[index], description=f"{label} epoch {epoch}/{epochs}", total=steps,
                                 completed=step, stats=f"loss {stats[0]:.4f} acc {percent(stats[1])}" if stats else "")
        elif kind == "epoch":
            epoch, epochs, logs = values
            self._say(f"{label} epoch {epoch:>2}/{epochs}  train loss {logs['ce']:.4f} acc {percent(logs['accuracy'])}   "
                      f"{_measured_on(logs)} loss {logs['val_ce']:.4f} acc {percent(logs['val_accuracy'])}")

    def finished(self, index: int, label: str, result) -> None:
        if index in self.tasks:
            self.progress.remove_task(self.tasks.pop(index))
        if result is None:  # interrupted: the closing line says what is kept
            return
        self.progress.advance(self.grid)
        metrics = result.metrics
        if metrics["status"] == "finished":  # trained by this grid, or found finished when its turn came
            done = "reused: finished already" if result.reused else "finished"
            split = result.config.evaluated_on
            self._say(f"{label}: {done}, {split} accuracy {percent(metrics[f'final_{split}_accuracy'])}")
        elif metrics["status"] == "failed":
            self._say(f"{label}: [red]failed[/]: {metrics['failure']['reason']}")


class Reporter(keras.callbacks.Callback):
    """In a grid's worker process (normtf.grid): the run's progress to the pool (steps at most every REPORT_EVERY seconds), and
    a stop, keeping the finished epochs, if the pool's process has gone (killed, its terminal closed)."""

    def __init__(self, events, pid: int, index: int, parent: int):
        super().__init__()
        self.events, self.pid, self.index, self.parent = events, pid, index, parent
        self.last = 0.0

    def _check_parent(self):
        if os.getppid() != self.parent:
            raise KeyboardInterrupt

    def on_epoch_begin(self, epoch, logs=None):
        self._check_parent()
        self.epoch = epoch + 1
        self.events.put(("step", self.pid, self.index, self.epoch, self.params["epochs"], 0, self.params["steps"], None))

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY:
            self._check_parent()
            self.last = now
            logs = logs or {}
            self.events.put(("step", self.pid, self.index, self.epoch, self.params["epochs"], batch + 1,
                             self.params["steps"], (float(logs.get("ce", 0)), float(logs.get("accuracy", 0)))))

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_accuracy" in logs:
            self.events.put(("epoch", self.pid, self.index, epoch + 1, self.params["epochs"],
                             {key: float(value) for key, value in logs.items()}))
