"""Live progress during training: a bar per epoch, then one line per finished epoch (rich). Where
the output is not a terminal (console.live_display), only the lines."""

from __future__ import annotations

import keras
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from normtf.console import console, live_display, percent


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
            self.progress.update(self.task, stats="evaluating on the test set")

    def on_epoch_end(self, epoch, logs=None):
        if self.progress:
            self.progress.remove_task(self.task)
        if logs and "val_accuracy" in logs:
            console.print(
                f"{self.label} epoch {epoch + 1:>2}/{self.params['epochs']}  "
                f"train loss {logs['ce']:.4f} acc {percent(logs['accuracy'])}   "
                f"test loss {logs['val_ce']:.4f} acc {percent(logs['val_accuracy'])}",
                highlight=False)
