"""What each normalization layer actually does, found by running it on a real batch.

Nothing here is a formula typed in: the statistics sets are found by testing which partition of
the layer's output has mean 0 and variance 1 in every part (gamma=1, beta=0 in a fresh model),
and the test-time difference by running the layer both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from normtf import data as mnist
from normtf.config import TrainConfig
from normtf.models import build_model, norm_layers
from normtf.norms import EPS


@dataclass
class NormReport:
    layer: str
    kind: str
    input_shape: tuple[int, ...]  # (N, H, W, C)
    reduces_over: str
    statistics: int  # how many means (and as many variances) the layer computed for this batch
    trainable: int
    non_trainable: int
    test_time_differs: bool
    test_time_max_change: float


def _partitions(shape, channels_divisors):
    """Candidate ways of splitting an (N, H, W, C) tensor into sets that share one mean/variance."""
    n, h, w, c = shape
    yield "N, H, W (per channel)", lambda y: y.transpose(3, 0, 1, 2).reshape(c, -1)
    yield "H, W, C (per sample)", lambda y: y.reshape(n, -1)
    for g in channels_divisors:
        yield (f"H, W, {c // g} of {c} channels (per sample and group)",
               lambda y, g=g: y.reshape(n, h * w, g, c // g).transpose(0, 2, 1, 3).reshape(n * g, -1))


def find_statistics_sets(inputs: np.ndarray, outputs: np.ndarray, epsilon: float = EPS) -> tuple[str, int]:
    """The finest partition in which every part of the output is standardized: mean 0 and variance
    v / (v + epsilon), v being the part's input variance (1 unless the part is nearly constant)."""
    c = inputs.shape[-1]
    found = None
    for name, split in _partitions(inputs.shape, [g for g in range(2, c + 1) if c % g == 0]):
        x, y = split(inputs.astype(np.float64)), split(outputs.astype(np.float64))
        v = x.var(axis=1)
        standardized = (np.abs(y.mean(axis=1)) < 1e-3).all() and (np.abs(y.var(axis=1) - v / (v + epsilon)) < 1e-2).all()
        if standardized and (found is None or len(y) > found[1]):
            found = (name, len(y))
    return found or ("(no partition standardizes the output)", 0)


def explain(norm: str, images: np.ndarray, config: TrainConfig | None = None) -> list[NormReport]:
    """Run a fresh `norm` model on `images` (normalized, (N, 28, 28, 1)) and report each norm layer."""
    config = config or TrainConfig(norm=norm)
    keras.utils.set_random_seed(config.seed)
    model = build_model(norm, config)
    layers = norm_layers(model)
    probe = keras.Model(model.inputs[0], [layer.input for layer in layers])
    reports = []
    for layer, x in zip(layers, probe(images, training=True)):  # as in a training step
        x = keras.ops.convert_to_numpy(x)
        train_out = keras.ops.convert_to_numpy(layer(x, training=True))
        test_out = keras.ops.convert_to_numpy(layer(x, training=False))
        reduces_over, statistics = find_statistics_sets(x, train_out)
        change = float(np.abs(train_out - test_out).max())
        reports.append(NormReport(
            layer=layer.name, kind=type(layer).__name__, input_shape=tuple(x.shape), reduces_over=reduces_over,
            statistics=statistics,
            trainable=sum(int(np.prod(w.shape)) for w in layer.trainable_weights),
            non_trainable=sum(int(np.prod(w.shape)) for w in layer.non_trainable_weights),
            test_time_differs=change > 1e-4, test_time_max_change=change,
        ))
    return reports


def explain_test_batch(config: TrainConfig, dataset: mnist.Mnist, batch_size: int) -> list[NormReport]:
    """`explain` on the first `batch_size` MNIST test images, normalized as the model sees them."""
    return explain(config.norm, mnist.normalized(dataset.x_test[:batch_size]), config)
