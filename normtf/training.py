"""Train one variant: seed, build, fit on a dataset, record every epoch, resume after interruption."""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from normtf import data
from normtf import distribute, xla
from normtf.config import TrainConfig
from normtf.errors import STOP_SIGNALS, CorruptFile, Interrupted, NormtfError, UsageError
from normtf.files import atomic_path, write_json
from normtf.model_files import save_model
from normtf.models import build_model, trainable_params
from normtf.norms import relevant
from normtf.runs import RunDir, code_version, is_finite, summarize

EVAL_BATCH = 1000
CPU_STEPS_PER_EXECUTION = 1
GPU_STEPS_PER_EXECUTION = 32


@dataclass
class Device:
    name: str
    precision: str
    jit: bool


@dataclass
class TrainResult:
    run: RunDir
    config: TrainConfig
    history: list[dict]
    metrics: dict
    reused: bool = False
    gallery: Path | None = None  # its misclassified test images, where the grid drew them right after training


def resolve_device(config: TrainConfig) -> Device:
    """auto: mixed_float16 + XLA on a GPU (where XLA compiles: xla.available); float32, no XLA on
    CPU (XLA made a CPU epoch 16x slower)."""
    gpus = tf.config.list_physical_devices("GPU")
    name = f"GPU x{len(gpus)}" if gpus else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    precision = config.precision if config.precision != "auto" else ("mixed_float16" if gpus else "float32")
    jit = {"on": True, "off": False, "auto": bool(gpus) and xla.available()}[config.jit]
    return Device(name, precision, jit)


@functools.cache
def make_strategy(name: str) -> tf.distribute.Strategy:
    """mirrored: every local GPU (or logical CPU); multi-worker: the machines TF_CONFIG names.
    Either way the global batch (--batch-size) is split over the replicas. One per process: a
    multi-worker strategy must be created before TensorFlow runs anything else."""
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi-worker":
        return distribute.multi_worker_strategy()
    return tf.distribute.get_strategy()


def environment(device: Device, strategy: tf.distribute.Strategy) -> dict:
    return {
        "device": device.name,
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "precision": device.precision,
        "jit_compile": device.jit,
        # Which GPUs the process was given and whether it shares them (a grid's jobs: normtf.job).
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_memory_growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true",
        "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),  # 0: one per core
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def set_seed(seed: int) -> None:
    """One seed for Python's random, NumPy and TensorFlow."""
    keras.utils.set_random_seed(seed)


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """constant: --lr throughout. one-cycle: linear warm-up from lr/10 to lr over the first 30% of
    the steps, then cosine annealing to zero (Smith's one-cycle, as PyTorch's OneCycleLR shapes it)."""
    if config.schedule == "constant":
        return config.lr
    total = config.epochs * steps_per_epoch
    warmup = round(0.3 * total)
    return keras.optimizers.schedules.CosineDecay(config.lr / 10, decay_steps=total - warmup, alpha=0.0,
                                                  warmup_target=config.lr, warmup_steps=warmup)


def compile_model(model: keras.Model, config: TrainConfig, jit: bool, steps_per_execution: int = 1,
                  steps_per_epoch: int = 1) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate(config, steps_per_epoch), momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # "ce" is the plain cross-entropy: the reported loss, without the L1 penalty in "loss".
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ce")],
        jit_compile=jit,
        steps_per_execution=steps_per_execution,
    )
    return model


def prepare(config: TrainConfig, steps_per_epoch: int = 1) -> tuple[keras.Model, Device, tf.distribute.Strategy]:
    """The compiled model of a run, as `train` and the benchmark use it: strategy, precision,
    seed, then the model built and compiled inside the strategy's scope."""
    strategy = make_strategy(config.strategy)
    xla.available()  # found out once, at the start (after the strategy: a TensorFlow op); says which under --verbose
    device = resolve_device(config)
    keras.mixed_precision.set_global_policy(device.precision)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_seed(config.seed)
    with strategy.scope():
        model = build_model(config.norm, config)  # a bad --groups fails here, before any training
        compile_model(model, config, device.jit, execution_steps(steps_per_epoch, device, config.steps_per_execution),
                      steps_per_epoch)
        # Now, not in the first step: variables made while tf.function traces that step make it
        # trace the whole step a second time (tests/test_training.py counts the traces).
        model.optimizer.build(model.trainable_variables)
    if config.strategy == "multi-worker":
        distribute.work_around_keras(model)  # keras#20585, tensorflow#72388
    return model, device, strategy


def execution_steps(steps_per_epoch: int, device: Device, requested: int | None = None) -> int:
    """Training steps run per call into TensorFlow (--steps-per-execution; by default 32 on a GPU,
    1 on CPU): fewer host round trips; the progress bar and the loss check see every Nth step.
    The largest divisor of the epoch's steps up to that, so epochs stay whole."""
    default = GPU_STEPS_PER_EXECUTION if device.name.startswith("GPU") else CPU_STEPS_PER_EXECUTION
    target = requested or default
    return max(d for d in range(1, target + 1) if steps_per_epoch % d == 0)


class _EpochKeeper(keras.callbacks.Callback):
    """Makes each epoch reproducible on its own and keeps it: reseeds dropout from (seed, epoch),
    stops at the first non-finite loss, and after each finished epoch writes its checkpoint and
    the history (checkpoint first, so the history never runs ahead of a checkpoint)."""

    def __init__(self, run: RunDir, config: TrainConfig, history: list[dict]):
        super().__init__()
        self.run, self.config, self.history = run, config, history
        self.failure = None
        self.interrupts = []  # signals received (_interrupts): raised again here if Python dropped one

    def _interrupted(self):
        if self.interrupts:
            raise KeyboardInterrupt

    def on_train_batch_begin(self, batch, logs=None):
        self._interrupted()

    def on_test_batch_begin(self, batch, logs=None):
        self._interrupted()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.started = epoch, time.perf_counter()
        for i, generator in enumerate(_seed_generators(self.model)):
            generator.state.assign(np.array([self.config.seed * 1000 + i, epoch << 24], dtype=generator.state.dtype))

    def on_train_batch_end(self, batch, logs=None):
        if self.failure is None and not is_finite(float((logs or {}).get("loss", 0.0))):
            self.failure = {"epoch": self.epoch + 1, "step": batch + 1,
                            "reason": f"loss became {float(logs['loss'])} by step {batch + 1} of epoch {self.epoch + 1}"}
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.failure is not None:
            return
        logs = logs if logs is not None else {}
        split = self.config.evaluated_on  # Keras's val_ logs are the test set's, or the validation split's
        record = {
            "epoch": epoch + 1,
            "train_loss": float(logs["ce"]),
            "train_objective": float(logs["loss"]),
            "train_accuracy": float(logs["accuracy"]),
            f"{split}_loss": float(logs["val_ce"]),
            f"{split}_accuracy": float(logs["val_accuracy"]),
            "epoch_time": time.perf_counter() - self.started,
        }
        if split == "validation":  # named in the logs the callbacks after this one see (progress's lines)
            logs.update(validation_loss=record["validation_loss"], validation_accuracy=record["validation_accuracy"])
        checkpoint = self.run.checkpoint(epoch + 1)
        with atomic_path(checkpoint) as partial:
            self.model.save_weights(partial)
        self.history.append(record)
        self.run.write_history(self.history)
        self.run.drop_replaced()  # a run replaced by --force goes only now that this one has an epoch
        for old in self.run.checkpoint_dir.glob("epoch-*.weights.h5"):
            if old != checkpoint:
                old.unlink()
        self._interrupted()  # after keeping the finished epoch


def _xla_failure(error) -> str:
    """One line for an op XLA cannot compile: which op, in which layer, and what to do."""
    text = str(error)
    op = re.search(r"'(\w+)' OpKernel", text) or re.search(r"op '?(\w+)'?", text)
    node = re.search(r"node (\S+)", text)
    layer = next((part for part in (node.group(1).split("/") if node else []) if part.startswith(("block", "head"))), None)
    where = f"the op {op.group(1) if op else '(unnamed)'}" + (f" in layer {layer}" if layer else "")
    return f"XLA cannot compile {where} ({text.strip().splitlines()[0][:160]}); train with --jit off"


def _seed_generators(model):
    return [layer.seed_generator for layer in model.layers  # none at --dropout 0
            if isinstance(layer, keras.layers.Dropout) and hasattr(layer, "seed_generator")]


@contextmanager
def _interrupts():
    """Ctrl-C (SIGINT), SIGTERM (`kill`, a container's stop) and SIGHUP (a closed terminal) stop
    training, surely. Python
    raises the KeyboardInterrupt wherever the main thread happens to be, and inside a finalizer
    (a tf.data iterator's __del__ as an epoch ends) it is printed and dropped: training then ran on
    to its end (seen once in the test suite on a busy machine). So each request is also kept in
    the yielded list, and _EpochKeeper raises it again at the next batch or epoch end. A signal
    the process was started ignoring (a job in the background of a script: SIGINT) stays ignored."""
    requested = []

    def handler(signum, frame):
        requested.append(signum)
        raise KeyboardInterrupt
    try:
        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
                    if signal.getsignal(signum) is not signal.SIG_IGN}
    except ValueError:  # not the main thread: leave signals alone
        yield requested
        return
    try:
        yield requested
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _start_state(run: RunDir, config: TrainConfig, force: bool, warn) -> tuple[str, list[dict]]:
    """Decide what to do with what is already in the run directory: reuse, resume or start. A
    truncated or corrupt history.json or metrics.json makes the run unfinished (one warning), as
    if it had stopped there: a finished run has no checkpoint left, so it is trained again (its
    files are set aside until the new run has an epoch); an unfinished one starts over, since the
    epochs before its checkpoint are lost with the history."""
    status = run.status(config)
    if force or status in ("empty", "failed"):
        return "fresh", []
    if status == "finished":
        try:
            return "reuse", run.read_history()
        except CorruptFile as e:
            warn(f"{e}; training it again")
            return "fresh", []
    if status == "stale":
        check_replaceable(run, config)
        warn(f"{run.path} holds an unfinished or failed run with other settings; starting over")
        return "fresh", []
    try:
        history = run.read_history()
        run.read_metrics()  # a corrupt one is reported here, not silently overwritten
    except CorruptFile as e:
        warn(f"{e}; starting over")
        return "fresh", []
    if history and not run.checkpoint(len(history)).exists():
        warn(f"{run.path}: no checkpoint for epoch {len(history)}; starting over")
        return "fresh", []
    return "resume", history


def check_replaceable(run: RunDir, config: TrainConfig) -> None:
    """A finished run is never replaced by one with other settings without --force."""
    stored = run.stored_config()
    metrics = run.read_metrics() or {}
    if stored is not None and stored != config and metrics.get("status") == "finished":
        changed = ", ".join(f"{k} {getattr(stored, k)} -> {getattr(config, k)}"
                            for k in config.to_dict() if getattr(stored, k) != getattr(config, k))
        raise UsageError(f"{run.path} holds a finished run with other settings ({changed}); "
                         "pass --force to replace it, or --runs-dir to keep both")


def require_tensorboard() -> None:
    """--tensorboard writes through tf.summary, which needs the tensorboard package; TensorFlow 2.21
    no longer installs it, and without it Keras's callback dies at the end of the first epoch."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs TensorBoard, which is not installed: pip install tensorboard") from None


def preflight(config: TrainConfig, runs_dir: Path | str, per_seed: bool = False, force: bool = False) -> TrainConfig:
    """Everything that can be refused before hours of training: bad settings, a variant that cannot
    be built, a finished run that would be replaced. Returns the run's (relevant) config."""
    config = relevant(config.validate())
    make_strategy(config.strategy)  # first: a multi-worker strategy must come before any TensorFlow op
    build_model(config.norm, config)
    if not force:
        try:
            check_replaceable(RunDir.for_config(runs_dir, config, per_seed), config)
        except CorruptFile:
            pass  # reported, and the run started over, when its turn comes
    return config


def train(config: TrainConfig, runs_dir: Path | str = "runs",
          dataset: data.Images | Callable[[], data.Images] | None = None, data_dir: Path | None = None,
          callbacks=(), tensorboard: bool = False, force: bool = False, per_seed: bool = False,
          warn=lambda message: None, lock_token: str | None = None) -> TrainResult:
    """Train `config.norm` into runs_dir/<norm>/ (per_seed: .../seed-<seed>/), resuming or reusing
    what is already there. `dataset` may be a function, called only if there is training to do.
    `lock_token`: a lock on the run held under this token is this process's (RunDir.locked)."""
    config = relevant(config.validate())
    if tensorboard:
        require_tensorboard()  # first: before the data is loaded or the run directory touched
    strategy = make_strategy(config.strategy)
    run = RunDir.for_config(distribute.worker_runs_dir(strategy, runs_dir, warn), config, per_seed)
    with run.locked(lock_token), distribute.peer_failures_as_errors(strategy):
        if run.recover():
            warn(f"{run.path}: a run started with --force never finished an epoch; the run it replaced is back")
        action, history = _start_state(run, config, force, warn)
        epochs_done = distribute.chief_epochs(strategy, len(history), config.epochs, action == "reuse")
        if action == "reuse":
            return TrainResult(run, config, history, run.read_metrics(), reused=True)
        images = (dataset() if callable(dataset) else dataset) or data.load(config.dataset, data_dir, warn=warn)
        if images.name != config.dataset:
            raise ValueError(f"a {config.dataset} run was given {images.name} images")  # a bug of the caller
        if config.validation:  # measured on images held out of the training set; the test set is not touched
            train_idx, eval_idx = data.validation_split(images.y_train, config.validation, config.train_size)
            eval_x, eval_y = images.x_train, images.y_train
        else:
            for flag, size, available in [("--train-size", config.train_size, len(images.y_train)),
                                          ("--test-size", config.test_size, len(images.y_test))]:
                if size is not None and size > available:
                    raise UsageError(f"{flag} {size} is more than the {available:,} images there are")
            train_idx = data.stratified_subset(images.y_train, config.train_size)
            eval_idx = data.stratified_subset(images.y_test, config.test_size)
            eval_x, eval_y = images.x_test, images.y_test
        if config.batch_size > len(train_idx):
            raise UsageError(f"--batch-size {config.batch_size} is more than the {len(train_idx):,} training images")
        steps = data.steps_per_epoch(len(train_idx), config.batch_size)
        model, device, strategy = prepare(config, steps)
        if action == "fresh":  # only now: a bad setting above leaves the directory as it was
            run.set_aside()
        split = {"validation_images": len(eval_idx), "validation_seed": data.VALIDATION_SEED} if config.validation \
            else {"test_images": len(eval_idx)}
        write_json(run.config, {"config": config.to_dict(), "environment": environment(device, strategy),
                                "normtf": code_version(), "data": images.provenance(), "train_images": len(train_idx),
                                **split, "trainable_params": trainable_params(model),
                                "steps_per_execution": model.steps_per_execution})
        if history:
            # Outside the scope: loading creates throwaway Keras objects, whose variables would be
            # collective ops under a multi-worker strategy that the other workers never join.
            model.load_weights(run.checkpoint(len(history)))
        distribute.copy_chief_state(strategy, model, epochs_done)

        keeper = _EpochKeeper(run, config, history)
        train_ds = data.train_dataset(images.x_train[train_idx], images.y_train[train_idx], config.batch_size,
                                      config.seed, config.rotation, epochs_done, config.epochs, images.mean, images.std)
        eval_ds = data.test_dataset(eval_x[eval_idx], eval_y[eval_idx], images.mean, images.std, EVAL_BATCH)
        extra = [keras.callbacks.TensorBoard(str(run.path / "tensorboard"))] if tensorboard else []
        try:
            with _interrupts() as keeper.interrupts:
                model.fit(train_ds, validation_data=eval_ds, epochs=config.epochs, initial_epoch=epochs_done,
                          steps_per_epoch=steps, callbacks=[keeper, *extra, *callbacks], shuffle=False, verbose=0)
        except BaseException as e:
            restored = run.recover()  # a --force run that never finished an epoch gives the old run back
            if isinstance(e, KeyboardInterrupt):
                for callback in [*extra, *callbacks]:
                    callback.on_train_end()  # Keras skips it on an exception: close progress bars and log writers
                kept = (f"the finished run it was replacing is back in {run.path}" if restored else
                        f"{len(history)} of {config.epochs} epochs of {config.norm} are kept in {run.path}; "
                        "run the same command again to resume")
                raise Interrupted(f"interrupted: {kept}", keeper.interrupts[0] if keeper.interrupts else None) from None
            if device.jit and isinstance(e, tf.errors.OpError) and "XLA" in str(e):
                raise NormtfError(_xla_failure(e)) from None
            raise

        distribute.report(strategy, model, warn)
        metrics = {"status": "finished", "norm": config.norm, "trainable_params": trainable_params(model)}
        if keeper.failure is not None:
            metrics.update(status="failed", failure=keeper.failure)
            if run.recover():  # failed in its first epoch: the finished run it was to replace stays
                warn(f"{run.path}: the new run failed before finishing an epoch; the finished run there is kept")
                return TrainResult(run, config, history, metrics)
        else:
            metrics.update(summarize(history))
            with atomic_path(run.model) as partial:
                save_model(model, partial)  # names Keras's layer classes: loads without normtf
        write_json(run.metrics, metrics)
        shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # only now: the results are safe
        return TrainResult(run, config, history, metrics)
