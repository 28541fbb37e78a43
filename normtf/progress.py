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
        self.first = True

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
        if self.first and epoch > 0:
            console.print(f"{self.label}: resuming after epoch {epoch} of {self.params['epochs']}", highlight=False)
        self.first = False
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
    accuracy so far), one bar for the whole grid counted in epochs (so its time left is read from the
    epochs done so far, as a run's bar is from its steps), and a line per resumed run, finished epoch
    and run above them. Where the output is not a terminal (a log file), only the lines."""

    def __init__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True, disable=not live_display())
        self.tasks: dict[int, int] = {}

    def _say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, soft_wrap=True)

    def start(self, runs: int, jobs: int, threads: int, where: str = "", epochs: int = 0) -> None:
        """`epochs`: the epochs the runs have left to train, the bar's length."""
        self._say(f"training {runs:,} run{'s' if runs != 1 else ''}, {jobs} at a time{where}, "
                  f"{threads} thread{'s' if threads != 1 else ''} each")
        self.runs, self.done = runs, 0
        self.grid = self.progress.add_task(self._grid_description(), total=epochs or None, stats="epochs")
        self.progress.start()

    def _grid_description(self) -> str:
        return f"all runs ({self.done} of {self.runs} ended)"

    def stop(self) -> None:
        self.progress.stop()

    def update(self, index: int, label: str, kind: str, *values) -> None:
        if kind == "begin":
            self.tasks[index] = self.progress.add_task(label, total=None, stats="starting")
        elif kind == "resume":
            kept, epochs = values
            self._say(f"{label}: resuming after epoch {kept} of {epochs}")
        elif kind == "step" and index in self.tasks:
            epoch, epochs, step, steps, stats = values
            self.progress.update(self.tasks[index], description=f"{label} epoch {epoch}/{epochs}", total=steps,
                                 completed=step, stats=f"loss {stats[0]:.4f} acc {percent(stats[1])}" if stats else "")
        elif kind == "epoch":
            epoch, epochs, logs = values
            self.progress.advance(self.grid)
            self._say(f"{label} epoch {epoch:>2}/{epochs}  train loss {logs['ce']:.4f} acc {percent(logs['accuracy'])}   "
                      f"{_measured_on(logs)} loss {logs['val_ce']:.4f} acc {percent(logs['val_accuracy'])}")

    def finished(self, index: int, label: str, result) -> None:
        """A run's end: its line, and the bar."""
        if index in self.tasks:
            self.progress.remove_task(self.tasks.pop(index))
        if result is None:  # interrupted: the closing line says what is kept
            return
        self.done += 1
        self.progress.update(self.grid, description=self._grid_description())
        metrics = result.metrics
        if metrics["status"] == "finished":  # trained by this grid, or found finished when its turn came
            done = "reused: finished already" if result.reused else "finished"
            split = result.config.evaluated_on
            self._say(f"{label}: {done}, {split} accuracy {percent(metrics[f'final_{split}_accuracy'])}")
        elif metrics["status"] == "failed":
            self._say(f"{label}: [red]failed[/]: {metrics['failure']['reason']}")


class Reporter(keras.callbacks.Callback):
    """In a grid's job (normtf.job): the run's progress to the grid through `send(event, index,
    **values)` (steps at most every REPORT_EVERY seconds, each finished epoch, and where it resumes),
    and a stop, keeping the finished epochs, if the job's parent has gone (killed, its terminal
    closed) where the system does not say so with a signal."""

    def __init__(self, send, index: int, parent: int):
        super().__init__()
        self.send, self.index, self.parent = send, index, parent
        self.last = 0.0
        self.first = True

    def _check_parent(self):
        if os.getppid() != self.parent:
            raise KeyboardInterrupt

    def on_epoch_begin(self, epoch, logs=None):
        self._check_parent()
        self.epoch, epochs = epoch + 1, self.params["epochs"]
        if self.first and epoch > 0:
            self.send("resume", self.index, kept=epoch, epochs=epochs)
        self.first = False
        self.send("step", self.index, epoch=self.epoch, epochs=epochs, step=0, steps=self.params["steps"], stats=None)

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY:
            self._check_parent()
            self.last = now
            logs = logs or {}
            self.send("step", self.index, epoch=self.epoch, epochs=self.params["epochs"], step=batch + 1,
                      steps=self.params["steps"], stats=[float(logs.get("ce", 0)), float(logs.get("accuracy", 0))])

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_accuracy" in logs:
            self.send("epoch", self.index, epoch=epoch + 1, epochs=self.params["epochs"],
                      logs={key: float(value) for key, value in logs.items()})
