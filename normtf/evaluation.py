"""Load a saved model safely and measure it on a dataset's test set."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normtf import data
from normtf.config import TrainConfig
from normtf.errors import CorruptFile, NormtfError, UsageError
from normtf.model_files import with_our_classes  # importing it also lets older files that name normtf's layers load
from normtf.norms import get_norm
from normtf.precise_bn import precise_statistics
from normtf.renorm import BatchRenormalization
from normtf.runs import RunDir

INPUT_SHAPE = (28, 28, 1)


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy (no L1 term)
    accuracy: float
    correct: int
    total: int
    probabilities: np.ndarray  # (N, 10)
    labels: np.ndarray  # (N,)
    images: np.ndarray  # (N, 28, 28) uint8, as stored
    classes: tuple[str, ...] = tuple(map(str, range(10)))  # the dataset's class names

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def confusion_matrix(self) -> np.ndarray:
        """Rows: true class; columns: predicted class."""
        matrix = np.zeros((10, 10), dtype=int)
        np.add.at(matrix, (self.labels, self.predictions), 1)
        return matrix

    def misclassified(self, count: int) -> np.ndarray:
        """Indices of the first `count` wrong predictions, in test-set order."""
        return np.flatnonzero(self.predictions != self.labels)[:count]


def load_model(path: Path):
    """Load a .keras file with safe_mode: a file carrying a Lambda layer or other code is refused.
    The model comes back with normtf's layers in place of Keras's (faster, as trained), and must
    take 28x28x1 images and give 10 outputs, as every dataset of data.DATASETS has."""
    import keras

    path = Path(path)
    if path.is_dir():
        _explain_missing_model(path)
        path = path / "model.keras"
    if not path.is_file():
        raise NormtfError(f"no model at {path}; train one first: normtf train --norm <norm>")
    if not zipfile.is_zipfile(path):
        raise NormtfError(f"{path} is not a readable .keras model file (truncated or corrupt?)")
    try:
        model = keras.models.load_model(path, safe_mode=True, compile=False)
    except ValueError as e:
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise NormtfError(f"{path} carries code (e.g. a Lambda layer) and was refused: loading it would "
                              "run that code. Only load such a file if you trust it, with your own script.") from None
        raise NormtfError(f"{path} is not a usable Keras model: {str(e).splitlines()[0]}") from None
    except (zipfile.BadZipFile, OSError, KeyError, EOFError, TypeError) as e:
        raise NormtfError(f"{path} is not a readable .keras model file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from None
    _check_shapes(model, path)
    return with_our_classes(model)


def _explain_missing_model(path: Path) -> None:
    """A run directory without model.keras: say why, where the directory tells (a failed run, or a
    --seeds parent holding seed-*/ runs)."""
    run = RunDir(path)
    if run.model.is_file():
        return
    try:
        metrics = run.read_metrics() or {}
    except CorruptFile:
        metrics = {}
    failure = metrics.get("failure") or {}
    if metrics.get("status") == "failed":
        raise NormtfError(f"{path}: this run failed at epoch {failure.get('epoch', '?')} step {failure.get('step', '?')} "
                          "(non-finite loss), so it has no model; train it again with other settings (e.g. a lower --lr)")
    seeds = sorted((p for p in path.glob("seed-*") if p.is_dir()), key=lambda p: (len(p.name), p.name))
    if seeds:
        raise NormtfError(f"no model at {path}; it holds the runs {', '.join(f'{p.name}/' for p in seeds)}: "
                          f"evaluate one of them, e.g. normtf evaluate {seeds[0]}")


def _check_shapes(model, path: Path) -> None:
    """One line, instead of a traceback from predict, for a model made for other images or classes."""
    def show(shape):
        return "x".join("?" if d is None else str(d) for d in shape)

    try:
        inputs, outputs = [tuple(t.shape) for t in model.inputs], [tuple(t.shape) for t in model.outputs]
    except (AttributeError, ValueError):  # a model with no recorded inputs: predict will tell
        return
    if len(inputs) != 1 or len(inputs[0]) != 4 or any(d not in (None, e) for d, e in zip(inputs[0][1:], INPUT_SHAPE)):
        raise NormtfError(f"{path} takes inputs of shape {', '.join(show(s[1:]) for s in inputs)}; normtf evaluates "
                          f"on {show(INPUT_SHAPE)} images (height x width x channels)")
    if len(outputs) != 1 or outputs[0][1:] not in ((10,), (None,)):
        raise NormtfError(f"{path} outputs {', '.join(show(s[1:]) for s in outputs)} values an image; "
                          "normtf evaluates 10 (one per class)")


def evaluate(model, images: np.ndarray, labels: np.ndarray, normalization: tuple[float, float],
             batch_size: int = 1000, warn=lambda message: None,
             classes: tuple[str, ...] = Evaluation.classes) -> Evaluation:
    """The model on these uint8 images, normalized with (mean, std) as in training; `classes` names
    the labels (the dataset's class names) for tables and galleries."""
    outputs = model.predict(data.test_dataset(images, labels, *normalization, batch_size).map(lambda x, y: x),
                            verbose=0)
    log_probs = as_log_probabilities(outputs.astype(np.float64), warn)
    correct = int((log_probs.argmax(axis=1) == labels).sum())
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    return Evaluation(loss, correct / len(labels), correct, len(labels), np.exp(log_probs), labels.astype(int), images,
                      classes)


def as_log_probabilities(outputs: np.ndarray, warn=lambda message: None, tolerance: float = 1e-3) -> np.ndarray:
    """The model's outputs as log-probabilities, which the test loss needs. normtf's models output
    them (log-softmax). A model that outputs probabilities (rows >= 0 summing to 1) gets their log,
    anything else is taken as logits and gets log-softmax, as Keras's from_logits=True losses
    take a model's output: either way the loss is the cross-entropy of what the model predicts,
    and the accuracy is unchanged, so evaluating beats refusing; `warn` says which was done."""
    with np.errstate(over="ignore"):  # large logits: exp overflows to inf, which is no sum of 1
        if np.all(np.abs(np.exp(outputs).sum(axis=1) - 1) <= tolerance):
            return outputs
    if np.all(outputs >= 0) and np.all(np.abs(outputs.sum(axis=1) - 1) <= tolerance):
        warn("the model outputs probabilities, not log-probabilities: the test loss uses their log")
        with np.errstate(divide="ignore"):
            return np.log(outputs)
    warn("the model's outputs are not log-probabilities (exp of a row does not sum to 1): taken as logits, "
         "the test loss applies log-softmax to them")
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def run_config(path: Path) -> TrainConfig | None:
    """The config of the run this model file or run directory belongs to, None if it is in none."""
    run = RunDir(path if Path(path).is_dir() else Path(path).parent)
    try:
        return run.stored_config()
    except (CorruptFile, KeyError, TypeError):
        return None


def load_test_set(name: str, data_dir: Path | None, warn=lambda message: None) -> data.Images:
    """The dataset `name` to score a model on. A --data-dir that holds another dataset's files
    (recognized by their SHA-256) is refused: training may use them as asked, but a score of a
    Fashion-MNIST model on MNIST images would be read as the model's. Files of no known dataset
    (a subset, a variant) are used, with data.load's warning."""
    said = []
    images = data.load(name, data_dir, warn=said.append)
    others = {data.identify(file, digest) for file, digest in (images.checksums or {}).items()} - {None, name}
    if others:
        found = ", ".join(data.DATASETS[other].title for other in sorted(others))
        raise UsageError(f"--data-dir {images.source} holds {found} files, not {images.spec.title}, the test set "
                         f"to score on; give a directory of {images.spec.title} files, or none (the cache)")
    for message in said:
        warn(message)
    return images


def scored_indices(labels: np.ndarray, test_size: int | None) -> np.ndarray:
    """The seeded class-stratified subset of `test_size` test images (all for None), as training
    tested on; a size beyond the test set is refused naming --test-size."""
    if test_size is not None and test_size > len(labels):
        raise UsageError(f"--test-size {test_size} is more than the {len(labels):,} test images there are")
    return data.stratified_subset(labels, test_size)


def which_test_set(images: data.Images, test_size: int | None, runs_own: bool) -> str:
    """Which test images a score is of, in words: all, or the seeded subset (the run's own when
    it came from the run's config.json rather than --test-size)."""
    total, title = len(images.y_test), images.spec.title
    if test_size is None or test_size == total:
        return f"all {total:,} {title} test images" + (", as the run was tested" if runs_own else "")
    chosen = "the run's own (its config.json's test_size)" if runs_own else "--test-size"
    return f"{test_size:,} of the {total:,} {title} test images, the seeded class-stratified subset: {chosen}"


def use_precise_statistics(model, config: TrainConfig, dataset: data.Images, dropout: bool = False) -> int:
    """Give the model's batch-norm layers precise statistics (normtf.precise_bn) from the images
    its run trained on (unrotated), at its batch size, with dropout off (as tested) or on (as
    trained); for a batch-renorm run, behind renorm's training output at its last step
    (renorm_limits). The number of layers changed (0: no batch norm)."""
    idx = data.stratified_subset(dataset.y_train, config.train_size)
    return precise_statistics(model, data.normalized(dataset.x_train[idx], dataset.mean, dataset.std),
                              config.batch_size, seed=config.seed, dropout=dropout,
                              renorm=renorm_limits(config, len(idx)))


def renorm_limits(config: TrainConfig, train_images: int) -> tuple[float, float] | None:
    """(rmax, dmax) of batch renormalization's schedule at the run's last training step (its
    layers count epochs x steps an epoch), None for a variant that is not batch renormalization.
    The saved file does not hold them: they are the variant's own layer's, at that step."""
    make = get_norm(config.norm).make
    layer = make(config) if make else None
    if not isinstance(layer, BatchRenormalization):
        return None
    steps = config.epochs * data.steps_per_epoch(train_images, config.batch_size)
    return tuple(float(limit) for limit in layer.limits(steps - 1))


def evaluate_file(path: Path, dataset: data.Images, test_size: int | None = None,
                  warn=lambda message: None, precise_bn: bool = False, dropout: bool = False) -> Evaluation:
    """The model at `path` on the test set; precise_bn: with its batch-norm statistics recomputed
    over the training images of its run (which config.json names), instead of the moving averages,
    gathered with dropout off or (`dropout`) on."""
    model = load_model(path)
    if precise_bn:
        config = run_config(path)
        if config is None:
            raise NormtfError(f"--precise-bn needs the run's config.json beside {path} (its batch size and "
                              "training images); evaluate a model inside its run directory")
        if use_precise_statistics(model, config, dataset, dropout) == 0:
            warn(f"{path} has no batch-norm layer: precise statistics change nothing")
    idx = scored_indices(dataset.y_test, test_size)
    return evaluate(model, dataset.x_test[idx], dataset.y_test[idx], (dataset.mean, dataset.std), warn=warn,
                    classes=dataset.spec.classes)
