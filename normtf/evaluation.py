"""Load a saved model safely and measure it on the MNIST test set."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normtf import data as mnist
from normtf import layers  # noqa: F401  registers normtf's layers, so saved models can name them
from normtf.errors import NormtfError


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy (no L1 term)
    accuracy: float
    correct: int
    total: int
    probabilities: np.ndarray  # (N, 10)
    labels: np.ndarray  # (N,)
    images: np.ndarray  # (N, 28, 28) uint8, as stored

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def confusion_matrix(self) -> np.ndarray:
        """Rows: true digit; columns: predicted digit."""
        matrix = np.zeros((10, 10), dtype=int)
        np.add.at(matrix, (self.labels, self.predictions), 1)
        return matrix

    def misclassified(self, count: int) -> np.ndarray:
        """Indices of the first `count` wrong predictions, in test-set order."""
        return np.flatnonzero(self.predictions != self.labels)[:count]


def load_model(path: Path):
    """Load a .keras file with safe_mode: a file carrying a Lambda layer or other code is refused."""
    import keras

    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise NormtfError(f"no model at {path}; train one first: normtf train --norm <norm>")
    if not zipfile.is_zipfile(path):
        raise NormtfError(f"{path} is not a readable .keras model file (truncated or corrupt?)")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except ValueError as e:
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise NormtfError(f"{path} carries code (e.g. a Lambda layer) and was refused: loading it would "
                              "run that code. Only load such a file if you trust it, with your own script.") from None
        raise NormtfError(f"{path} is not a usable Keras model: {str(e).splitlines()[0]}") from None
    except (zipfile.BadZipFile, OSError, KeyError, EOFError, TypeError) as e:
        raise NormtfError(f"{path} is not a readable .keras model file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from None


def evaluate(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> Evaluation:
    log_probs = model.predict(mnist.test_dataset(images, labels, batch_size).map(lambda x, y: x), verbose=0)
    log_probs = log_probs.astype(np.float64)
    correct = int((log_probs.argmax(axis=1) == labels).sum())
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    return Evaluation(loss, correct / len(labels), correct, len(labels), np.exp(log_probs), labels.astype(int), images)


def evaluate_file(path: Path, dataset: mnist.Mnist, test_size: int | None = None) -> Evaluation:
    model = load_model(path)
    idx = mnist.stratified_subset(dataset.y_test, test_size)
    return evaluate(model, dataset.x_test[idx], dataset.y_test[idx])
