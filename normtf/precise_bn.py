"""Precise batch-norm statistics (PreciseBN; Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

A batch-norm layer is trained on each batch's own mean and variance, and evaluated with
exponential moving averages of them. Those averages mix statistics of earlier steps' weights
(momentum 0.9: mostly the last twenty or so), and at small batches they are noisy. Recomputing
each layer's population mean and variance over the training set, with the trained weights
frozen, gives the test-time network the statistics it should have: if batch norm's error at
small batches drops with them, the moving averages were the problem; if it stays, training on
noisy batch statistics was.
"""

from __future__ import annotations

import math

import numpy as np

from normtf.errors import NormtfError, UsageError

CHUNK = 1024  # images per forward call, rounded down to whole batches (at least one)


def precise_statistics(model, images: np.ndarray, batch_size: int, seed: int = 0) -> int:
    """Set every batch-norm layer's moving mean and variance to its statistics over `images`
    (the training images, float32 (N, 28, 28, 1), normalized as the model sees them), as seen in
    training at `batch_size`. Returns how many layers were updated; a model without batch norm is left as
    it is (0).

    The forward pass is the training-time network with dropout off: each batch-norm layer
    normalizes by its own batch's statistics, so a later layer sees the inputs training gave it,
    while dropout and every other layer run as at test time, because the statistics are for the
    test-time network. `batch_size` is the batch each layer normalized over in training (per
    replica if trained on several without --sync-bn): at batch 2 a layer's input is shaped by
    2-image statistics, and that is the input whose population statistics the test needs.

    The batches are consecutive images of images[np.random.default_rng(seed).permutation(N)]:
    random, as training draws them, whatever order the caller's images are in. The last partial
    batch is dropped, so that every batch is of the trained size (at most batch_size - 1 images
    unused; a batch of 1 at batch size 2 would be a statistic training rarely saw).
    All batches being equal, the population mean is the mean of the batch means, and the
    variance the mean of (batch variance + batch mean^2) minus the mean squared: the variance of
    every activation seen. Sums are float64: thousands of batches would lose float32's digits.

    Only batch norm couples the images of a batch, so a call runs CHUNK images at once and each
    layer normalizes each group of `batch_size` consecutive images by the group's statistics:
    what batch after batch would compute, faster (20,000 images at batch 2: 10-13 s against
    31-33 s one batch per call, on 2 cores shared with a training run). Batch-norm layers that
    were frozen (trainable=False) normalized with their moving statistics in training too, and
    keep them."""
    import keras
    import tensorflow as tf

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not norms:
        return 0
    if not isinstance(model, keras.Sequential):
        raise NormtfError(f"precise statistics run a Sequential model layer by layer; "
                          f"{model.name} is a {type(model).__name__}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"the batch size for precise statistics must be a positive whole number (got {batch_size!r})")
    batches = len(images) // batch_size
    if batches == 0:
        raise NormtfError(f"precise statistics need at least one batch of {batch_size} images; got {len(images)}")

    images = np.asarray(images, np.float32)
    order = np.random.default_rng(seed).permutation(len(images))[:batches * batch_size]
    ids = {id(layer) for layer in norms}
    walk = model.layers[:max(model.layers.index(layer) for layer in norms) + 1]  # nothing after the last is needed

    @tf.function(input_signature=[tf.TensorSpec((None, *images.shape[1:]), tf.float32)])
    def forward(x):
        statistics = []
        for layer in walk:
            if id(layer) in ids:
                x, mean, variance = _batch_norm(layer, x, batch_size)
                statistics.append((mean, variance))
            else:
                x = layer(x, training=False)
        return statistics

    totals = [np.zeros((2, layer.moving_mean.shape[-1])) for layer in norms]  # sum of means, of variance + mean^2
    per_call = batch_size * max(1, CHUNK // batch_size)
    for start in range(0, len(order), per_call):
        for total, (mean, variance) in zip(totals, forward(images[order[start:start + per_call]])):
            mean, variance = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
            total += [mean.sum(axis=0), (variance + mean**2).sum(axis=0)]
    for layer, (sum_mean, sum_square) in zip(norms, totals):
        mean = sum_mean / batches
        variance = np.maximum(sum_square / batches - mean**2, 0)  # >= 0 exactly; rounding may dip below
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    return len(norms)


def _batch_norm(layer, x, batch_size: int):
    """The batch-norm layer's training-time output for x, each group of batch_size consecutive
    images normalized by its own statistics; and those (K groups, C channels) means and biased
    variances (Keras's and normtf's layers normalize by the biased one). As normtf.fused_norms does,
    in float32 and summed per image first, then over the batch: one float32 sum over a whole
    batch's pixels drifts with its length."""
    from keras import ops

    if layer.axis not in (-1, len(x.shape) - 1):
        raise NormtfError(f"precise statistics need batch norm over the last (channel) axis; "
                          f"{layer.name} has axis {layer.axis}")
    shape, channels = ops.shape(x), x.shape[-1]
    groups = ops.reshape(ops.cast(x, "float32"), (-1, batch_size, math.prod(x.shape[1:-1]), channels))  # (K, B, P, C)

    def mean_over_batch(t):
        return ops.mean(ops.mean(t, axis=2, keepdims=True), axis=1, keepdims=True)  # (K, 1, 1, C)

    mean = mean_over_batch(groups)
    centered = groups - mean
    variance = mean_over_batch(ops.square(centered))
    scale = ops.rsqrt(variance + layer.epsilon) * (ops.cast(layer.gamma, "float32") if layer.scale else 1.0)
    out = centered * scale + (ops.cast(layer.beta, "float32") if layer.center else 0.0)
    return ops.cast(ops.reshape(out, shape), layer.compute_dtype), mean[:, 0, 0], variance[:, 0, 0]
