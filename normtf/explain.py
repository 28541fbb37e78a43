"""What each normalization layer actually does, found by running it on a real batch.

Nothing here is a formula typed in: the statistics sets are found by testing in which partition of
the layer's output every part is the standardization of that part of its input (gamma=1, beta=0
in a fresh model), and the test-time difference by running the layer both ways. A model without
norm layers (`none`) has each block's ReLU tested the same way (nothing standardizes). What a
variant adds is measured too: batch renormalization's r and d on the batch (by the layer's own
code), and a weight-standardized convolution's kernel, read back by convolving unit impulses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import keras
import numpy as np

from normtf import data
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
    notes: tuple[str, ...] = ()  # what else the block computes, measured: r and d, a standardized kernel


UNIT_ROUNDOFF = 2.0**-24  # float32's: the relative error of one rounding


def _partitions(shape, channels_divisors):
    """Candidate ways of splitting an (N, H, W, C) tensor into sets that share one mean/variance:
    (name, number of parts, shape). The tensor reshaped to `shape` (a view, no copy) is
    (outer, K, parts per outer, L), and part (o, p) is all of [o, :, p, :]."""
    n, h, w, c = shape
    yield "N, H, W (per channel)", c, (1, n * h * w, c, 1)
    yield "H, W, C (per sample)", n, (n, h * w, 1, c)
    for g in channels_divisors:
        name = "H, W (per sample and channel)" if g == c else f"H, W, {c // g} of {c} channels (per sample and group)"
        yield name, n * g, (n, h * w, g, c // g)


def _moments(pieces) -> dict[str, np.ndarray]:
    """Per part of (outer, K, parts, L) float64 pieces: the means of x, y, x², y², xy and |x|, and
    the largest |x| and |y|, each shaped (outer, parts)."""
    dot = functools.partial(np.einsum, "okpl,okpl->op")
    sums, largest, count = 0, 0, 0
    for xs, ys in pieces:
        size = np.abs(xs)
        sums = sums + np.stack([xs.sum(axis=(1, 3)), ys.sum(axis=(1, 3)), dot(xs, xs), dot(ys, ys), dot(xs, ys),
                                size.sum(axis=(1, 3))])
        largest = np.maximum(largest, np.stack([size.max(axis=(1, 3)), np.abs(ys).max(axis=(1, 3))]))
        count += xs.shape[1] * xs.shape[3]
    return dict(zip(["x", "y", "xx", "yy", "xy", "abs_x"], sums / count)) | {"max_x": largest[0], "max_y": largest[1]}


def _affine(pieces, moments) -> bool:
    """Whether y is one affine map of x in every part, to the rounding of float32 arithmetic: each
    output element is a few float32 operations on its input and its part's statistics, so its
    distance from the float64 least-squares line is a few roundings of the values involved,
    whatever the size of the part (in a wrong partition it is a million times larger)."""
    v = np.maximum(moments["xx"] - moments["x"] ** 2, 0)
    slope = np.where(v > 0, (moments["xy"] - moments["x"] * moments["y"]) / np.where(v > 0, v, 1), 0)
    intercept = moments["y"] - slope * moments["x"]
    allowed = 16 * UNIT_ROUNDOFF * (np.abs(slope) * moments["max_x"] + moments["max_y"] + np.abs(intercept))
    for xs, ys in pieces:
        ys -= slope[:, None, :, None] * xs + intercept[:, None, :, None]
        if (np.abs(ys).max(axis=(1, 3)) > allowed).any():
            return False
    return True


def _standardizes(x: np.ndarray, y: np.ndarray, epsilon: float) -> bool:
    """Whether every part [o, :, p, :] of the float32 output `y` is one standardization of that part
    of `x` (both shaped (outer, K, parts per outer, L)).

    Two tests, each with the tolerance float32 arithmetic allows, so that the answer does not
    depend on the batch size: one affine map per part (_affine), and that map a standardization:
    mean 0 and variance v / (v + eps), v being the part's input variance, up to the error of the
    layer's float32 sums over the part's m values, which can reach m roundings (recursive
    summation: Higham, Accuracy and Stability, section 4.2). At a batch of 10,000 a batch-norm part
    has 6.76 M values; a layer that sums them in one float32 pass (Keras's own did, and normtf's
    before it summed per sample first) is up to 6% off in variance, which the fixed tolerance this
    replaced took for "not standardized". Partitions coarser than the true one fail the first test,
    finer ones the second (with their own, smaller m). The sums are float64, over a few million
    values at a time in the tensor's own memory order; a wrong partition is usually refused on
    its first few million."""
    outer, k, parts, length = x.shape
    step = max(1, 2**22 // (outer * parts * length))

    def pieces():
        for start in range(0, k, step):
            yield x[:, start:start + step].astype(np.float64), y[:, start:start + step].astype(np.float64)

    head = [next(pieces())]
    if not _affine(head, _moments(head)):
        return False
    moments = _moments(pieces())
    if not _affine(pieces(), moments):
        return False
    v = np.maximum(moments["xx"] - moments["x"] ** 2, 0)
    expected, y_var = v / (v + epsilon), moments["yy"] - moments["y"] ** 2
    summed = k * length * UNIT_ROUNDOFF  # relative error bound of a float32 sum over one part
    return bool((np.abs(moments["y"]) <= np.maximum(1e-3, summed * moments["abs_x"] / np.sqrt(v + epsilon))).all()
                and (np.abs(y_var - expected) <= max(1e-2, summed) * expected + 1e-6).all())


def find_statistics_sets(inputs: np.ndarray, outputs: np.ndarray, epsilon: float = EPS) -> tuple[str, int]:
    """The partition in which every part of the output is one standardization of that part of the
    input: those parts are the sets that share one mean and one variance. Coarser partitions fail
    (one map per part), finer ones too (mean 0, variance 1 per part); the candidates are tried
    from the fewest parts up."""
    c = inputs.shape[-1]
    candidates = sorted(_partitions(inputs.shape, [g for g in range(2, c + 1) if c % g == 0]), key=lambda p: p[1])
    for name, parts, shape in candidates:
        if _standardizes(inputs.reshape(shape), outputs.reshape(shape), epsilon):
            return name, parts
    return "(no partition standardizes the output)", 0


def explain(norm: str, images: np.ndarray, config: TrainConfig | None = None) -> list[NormReport]:
    """Run a fresh `norm` model on `images` (normalized, (N, 28, 28, 1)) and report each norm layer
    (for a model without any, each block's ReLU: the layer where a norm would act on its output)."""
    config = config or TrainConfig(norm=norm)
    keras.utils.set_random_seed(config.seed)
    model = build_model(norm, config)
    layers = norm_layers(model) or [layer for layer in model.layers if layer.name.endswith("_relu")]
    probe = keras.Model(model.inputs[0], [layer.input for layer in layers])
    reports = []
    for layer, x in zip(layers, probe(images, training=True)):  # as in a training step
        x = keras.ops.convert_to_numpy(x)
        notes = _renormalization(layer, x) if hasattr(layer, "corrections") else ()
        conv = model.get_layer(layer.name.split("_")[0] + "_conv")
        notes += _standardized_kernel(conv) if hasattr(conv, "saved_as") else ()
        train_out = keras.ops.convert_to_numpy(layer(x, training=True))
        test_out = keras.ops.convert_to_numpy(layer(x, training=False))
        reduces_over, statistics = find_statistics_sets(x, train_out)
        change = float(np.abs(train_out - test_out).max())
        reports.append(NormReport(
            layer=layer.name, kind=type(layer).__name__, input_shape=tuple(x.shape), reduces_over=reduces_over,
            statistics=statistics,
            trainable=sum(int(np.prod(w.shape)) for w in layer.trainable_weights),
            non_trainable=sum(int(np.prod(w.shape)) for w in layer.non_trainable_weights),
            test_time_differs=change > 1e-4, test_time_max_change=change, notes=notes,
        ))
    return reports


def _renormalization(layer, x: np.ndarray) -> tuple[str]:
    """Batch renormalization's r and d for batch x, as the layer computes them (its `corrections`)
    against the moving statistics it holds, unclipped, and the clipping its schedule applies."""
    mean, variance = keras.ops.moments(keras.ops.convert_to_tensor(x), axes=[0, 1, 2])
    r, d = (keras.ops.convert_to_numpy(t) for t in layer.corrections(mean, variance, clip=False))
    step = int(keras.ops.convert_to_numpy(layer.step))
    r_max, d_max = (float(v) for v in layer.limits(step))
    clipped = (f"clipped to r = 1, d = 0 in the warm-up (batch norm until step {layer.warmup_steps:,})"
               if r_max == 1 and d_max == 0 else f"clipped at step {step:,} to [{1 / r_max:.3g}, {r_max:.3g}] and ±{d_max:.3g}")
    return (f"{layer.name}: r = σ_B/σ from {r.min():.3f} to {r.max():.3f}, d = (μ_B − μ)/σ from {d.min():.3f} to "
            f"{d.max():.3f} on this batch, {clipped}",)


def _standardized_kernel(conv) -> tuple[str]:
    """The kernel a weight-standardized convolution convolves with, read back by running it on
    unit impulses (one image per kernel weight), and how many of its output channels have
    weights of mean 0 and variance 1 (n − 1, as the paper's reference code's std)."""
    kh, kw, channels_in, channels_out = conv.kernel.shape
    n = kh * kw * channels_in
    impulses = np.eye(n, dtype=np.float32).reshape(n, kh, kw, channels_in)
    out = keras.ops.convert_to_numpy(conv(impulses))
    kernel = out[:, (out.shape[1] - 1) // 2, (out.shape[2] - 1) // 2, :].astype(np.float64)  # (n, out)
    mean, variance = kernel.mean(axis=0), kernel.var(axis=0, ddof=1)
    standardized = int(((np.abs(mean) < 1e-5) & (np.abs(variance - 1) < 1e-3)).sum())
    return (f"{conv.name}: {standardized} of {channels_out} output channels' kernels at mean 0 and variance 1 over "
            f"their {n} weights (largest |mean| {np.abs(mean).max():.1e}, |variance − 1| "
            f"{np.abs(variance - 1).max():.1e})",)


def explain_test_batch(config: TrainConfig, dataset: data.Images, batch_size: int) -> list[NormReport]:
    """`explain` on the first `batch_size` test images, normalized as the model sees them."""
    return explain(config.norm, data.normalized(dataset.x_test[:batch_size], dataset.mean, dataset.std), config)
