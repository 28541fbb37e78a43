"""Training on several machines (`--strategy multi-worker`): who writes the run, how a resumed run
starts alike on every worker, what a lost worker looks like, and one workaround for Keras.

Every worker runs the same `normtf train` command; TF_CONFIG tells each its index. Worker 0, the
chief, owns the run directory. The others train into a scratch directory that is removed when they
exit (as TensorFlow's multi-worker guide does), or by the next start of a worker if it was killed,
so that workers on one machine never fight over <runs-dir>/<norm>/, and workers on other machines
need no shared disk: a resumed run takes its epoch count and weights from the chief, over the
network. A rerun of a finished run ends every worker with one line and exit code 0.

When a worker dies, TensorFlow's C++ runtime prints its view of it (missed heartbeats, aborted
collectives) on the others, before and after the one line normtf prints: so under this strategy
the runtime's lines go to /dev/null unless `normtf --verbose` (quiet.verbose).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from normtf import quiet
from normtf.errors import NormtfError, NothingToDo


def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """A dead worker is noticed by the coordination service that this strategy starts: heartbeats
    stop, and the others' collective ops fail (in about 10 s here) instead of waiting for ever. No
    CommunicationOptions(timeout_seconds): TensorFlow documents it as for debugging only (one extra
    thread per collective op for the whole timeout). From here on, TensorFlow's C++ lines are
    hidden unless --verbose when there are several workers (_hide_runtime_lines)."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if workers(strategy) > 1:
        _hide_runtime_lines()
    return strategy


def _hide_runtime_lines() -> None:
    """Descriptor 2 (where TensorFlow's C++ runtime writes) to /dev/null for the rest of the
    process; Python's sys.stderr (normtf's lines, warnings, tracebacks) keeps writing to the real
    one, through a duplicate of it. Without this, a worker's death prints the runtime's error
    lines around normtf's one line, some of them as the process exits."""
    global _runtime_lines_hidden
    if quiet.verbose or _runtime_lines_hidden:
        return
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _runtime_lines_hidden = True


_runtime_lines_hidden = False


def workers(strategy: tf.distribute.Strategy) -> int:
    """How many processes train together: the chief and workers TF_CONFIG names (1 without it)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    roles = resolver.cluster_spec().as_dict()  # {"worker": [addresses], ...}; empty without TF_CONFIG
    return max(1, sum(len(addresses) for role, addresses in roles.items() if role in ("chief", "worker")))


def worker_name(strategy: tf.distribute.Strategy) -> str:
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id} of {workers(strategy)}"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    return strategy.extended.should_checkpoint


SCRATCH = "normtf-scratch-"  # a non-chief's scratch directory: then <pid>-<task type>-<task index>-<random>


def worker_runs_dir(strategy: tf.distribute.Strategy, runs_dir: Path | str, warn) -> Path:
    """runs_dir for the chief (and any single process); a scratch directory, removed when the
    process exits, for every other worker. A killed worker cannot remove its own: its name
    carries the process id, and the next worker to start here removes those of dead processes."""
    if workers(strategy) == 1 or is_chief(strategy):
        return Path(runs_dir)
    resolver = strategy.cluster_resolver
    _remove_dead_scratch()
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-{resolver.task_type}-{resolver.task_id}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    warn(f"this is {worker_name(strategy)}: the chief writes the run to its {runs_dir}; this worker's copy goes "
         f"to {scratch} and is removed when it exits")
    return Path(scratch)


def _remove_dead_scratch() -> None:
    """Remove the scratch directories of workers that were killed (their process is gone)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH}*"):
        pid = path.name[len(SCRATCH):].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _from_chief(strategy: tf.distribute.Strategy, value):
    """The chief's value of `value`, on every worker: a sum over workers where only the chief adds."""
    value = tf.convert_to_tensor(value)
    return strategy.reduce("SUM", value if is_chief(strategy) else tf.zeros_like(value), axis=None)


def chief_epochs(strategy: tf.distribute.Strategy, epochs_done: int, epochs: int, finished: bool) -> int:
    """The epochs the chief has finished (all of them if it holds the finished run): every worker
    starts where the chief does, whatever its own scratch directory holds."""
    if workers(strategy) == 1:
        return epochs_done
    done = int(_from_chief(strategy, tf.constant(epochs if finished else epochs_done, tf.int64)))
    if done >= epochs and not is_chief(strategy):
        raise NothingToDo(f"{worker_name(strategy)}: finished; the chief already holds this finished run (pass "
                          "--force to every worker to train it again)")
    return done


def copy_chief_state(strategy: tf.distribute.Strategy, model: keras.Model, epochs_done: int) -> None:
    """A resumed run: the chief has loaded its checkpoint; give every worker its weights, moving
    statistics and optimizer state (momentum, step count), so that the replicas agree again."""
    if workers(strategy) == 1 or epochs_done == 0:
        return
    with strategy.scope():
        for variable in [*model.weights, *model.optimizer.variables]:
            variable.assign(_from_chief(strategy, variable.value))


def weights_digest(model: keras.Model) -> str:
    """A short fingerprint of every weight, to check that the workers ended alike."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def report(strategy: tf.distribute.Strategy, model: keras.Model, warn) -> None:
    """One line per worker at the end: equal fingerprints on every worker mean equal weights."""
    if workers(strategy) > 1:
        role = "the chief, wrote the run" if is_chief(strategy) else "its scratch copy is removed"
        warn(f"{worker_name(strategy)} finished ({role}); weights sha256 {weights_digest(model)}")


# What a collective op raises when a peer is gone (heartbeats stopped, connection refused or reset).
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                 tf.errors.CancelledError)


@contextmanager
def peer_failures_as_errors(strategy: tf.distribute.Strategy):
    """A worker that dies ends the others with one line instead of a traceback of collective ops."""
    try:
        yield
    except PEER_FAILURES as e:
        if workers(strategy) == 1:
            raise
        raise NormtfError(f"{worker_name(strategy)}: {_what_was_lost(e)}; the chief keeps every finished epoch: "
                          "start every worker again to resume (--verbose shows TensorFlow's own lines)") from None


def _what_was_lost(error: Exception) -> str:
    text = str(error)
    if "unhealthy" in text:  # the coordination service's heartbeats named the dead
        tasks = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text.split("unhealthy", 1)[1])))
        return f"{', '.join(f'{job} {task}' for job, task in tasks) or 'a worker'} stopped (no heartbeat)"
    cause = re.sub(r"\{\{[^}]*\}\}\s*", "", text).strip().splitlines()
    return f"lost contact with the other workers ({type(error).__name__}: {(cause or ['no detail'])[0][:200]})"


def work_around_keras(model: keras.Model) -> keras.Model:
    """Makes Keras's `fit` work with two or more workers; Keras 3.13 and TF 2.21 fail in two places
    (keras-team/keras#20585, tensorflow/tensorflow#72388). Both are Keras's TensorFlow trainer
    calling `strategy.reduce` on something MultiWorkerMirroredStrategy cannot reduce:

    1. Before training, `_maybe_symbolic_build` reduces a whole (images, labels) batch to build the
       model from it: `ValueError: Attempt to convert a value (PerReplica:{...}) ... to a Tensor`.
       Building needs only shapes and dtypes, so it is given the first local replica's share.
    2. After every train or test step, the step's logs (scalars: loss, accuracy, ...) are averaged
       over the workers with `reduce("MEAN", value, axis=0)`: `ValueError: Invalid reduction
       dimension 0 for input with 0 dimensions`. Each step's logs get a leading axis of 1, so that
       this mean is the mean over the workers, as every worker needs it (equal batches per worker).

    When tests/test_distributed.py::test_keras_multi_worker_fit_still_needs_the_workaround fails,
    Keras is fixed and this can go."""
    strategy = model.distribute_strategy
    if workers(strategy) == 1:  # Keras takes its single-worker path, which works
        return model

    def first_replica(value):
        return strategy.experimental_local_results(value)[0] if isinstance(value, tf.distribute.DistributedValues) else value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(first_replica, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def with_leading_axis(step):
        return lambda data: keras.tree.map_structure(lambda value: value[None], step(data))

    # Instance attributes shadow Keras's TensorFlowTrainer methods of the same names.
    model._maybe_symbolic_build = maybe_symbolic_build
    model.train_step = with_leading_axis(model.train_step)
    model.test_step = with_leading_axis(model.test_step)
    return model
