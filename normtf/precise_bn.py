"""Precise batch-norm statistics (PreciseBN; Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021),
gathered with dropout off or on, so that a model with batch norm can be tested three ways.

A batch-norm layer is trained on each batch's own mean and variance, and tested with exponential
moving averages of them (momentum 0.9: mostly the last twenty or so steps' batches, each made by
that step's weights). Recomputing each layer's population mean and variance over the training
images, with the trained weights frozen, gives the test-time network statistics of the final
weights instead. Two things can set the moving averages apart from what the test needs, and the
three measurements (MEASURES) separate them:

- **moving averages**: the statistics training kept, as `normtf train` tests the model.
- **precise, dropout on**: statistics recomputed with dropout as in training (a fresh mask per
  batch, drawn as a training step draws it). The inputs are those the moving averages were
  recorded on, from the final weights: against the moving averages, what the averaging costs
  (its lag behind the weights, its noise).
- **precise, dropout off**: statistics recomputed with dropout as at test time (off), what
  PreciseBN computes. Against dropout on, what dropout's variance shift costs: inverted dropout
  keeps an activation's mean but raises its variance, so a batch-norm layer after a dropout
  (each block's dropout feeds the next block's norm) is tested with a variance recorded on
  noisier inputs than it gets (Li et al., "Understanding the Disharmony between Dropout and Batch
  Normalization", CVPR 2019).

The statistics are gathered on the run's training images unrotated (training rotates them by up
to 8 degrees): the same images, without the augmentation.
"""

from __future__ import annotations

import math

import numpy as np

from normtf.errors import NormtfError, UsageError

CHUNK = 1024  # images per forward call, rounded down to whole batches (at least one)
CACHE_BYTES = 512 * 2**20  # batch renormalization: the most a layer's inputs kept between its passes take

# The three test errors of a model with batch norm: the sweep's JSON field of each (normtf.sweep),
# and its name in tables, figures and `normtf evaluate --precise-bn`.
ERROR, PRECISE, PRECISE_DROPOUT_ON = ("test_error_percent", "test_error_percent_precise_bn",
                                       "test_error_percent_precise_bn_dropout_on")
MEASURES = {ERROR: "moving averages", PRECISE_DROPOUT_ON: "precise, dropout on", PRECISE: "precise, dropout off"}


def precise_statistics(model, images: np.ndarray, batch_size: int, seed: int = 0, dropout: bool = False,
                       renorm: tuple[float, float] | None = None) -> int:
    """Set every batch-norm layer's moving mean and variance to its statistics over `images`
    (the training images, float32 (N, 28, 28, 1), normalized as the model sees them), as seen in
    training at `batch_size`. Returns how many layers were updated; a model without batch norm is left as
    it is (0).

    The forward pass is the training-time network: each batch-norm layer normalizes by its own
    batch's statistics, so a later layer sees the inputs training gave it. Dropout is off, as at
    test time, or with `dropout` on, as in training: each dropout layer multiplies each batch by
    its own mask, made by normtf's hash (normtf.dropout.keep_masks, the layer's rate) from a key
    drawn for (seed, the layer's place, the batch's number), so the masks are reproducible and do
    not depend on how many batches a call runs. Every other layer runs as at test time.
    `batch_size` is the batch each layer normalized over in training (per
    replica if trained on several without --sync-bn): at batch 2 a layer's input is shaped by
    2-image statistics, and that is the input whose population statistics the test needs.

    `renorm`, the (rmax, dmax) that batch renormalization's schedule reached at the run's last
    step (normtf.renorm), makes each batch-norm layer's output renorm's training output: the
    batch's statistics corrected by r and d, clipped to those limits, against the layer's
    statistics. The layers' statistics are then gathered one after the other, each behind earlier
    layers that already hold their new ones: a pass per layer, from the inputs of an earlier layer
    kept from its pass when they fit CACHE_BYTES (the sweep's block 3 on), else from the images.
    A saved batch-renorm model is plain batch norm, so without `renorm` the later layers'
    statistics would be gathered behind earlier layers that normalize by raw batch statistics,
    which neither training (r and d) nor the test computes. With it they are gathered on the
    inputs renorm's training computation gives them from the final weights and the statistics the
    test will use: where r and d are not clipped (rmax 3 and dmax 5 from step 4,000: the sweep's
    batch 2 to 8) that is the test-time network itself, as renorm intends; where the run never left
    the warm-up (rmax 1, dmax 0: the sweep's batch 128) it is batch norm's pass exactly. (Against
    the saved moving statistics instead, in one pass, a later layer's statistics would be those of
    inputs normalized by statistics the test no longer uses, with dropout off statistics recorded
    with dropout on: the test error of a batch-8 sweep run came out several times its moving
    averages'.)

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

    order = np.random.default_rng(seed).permutation(len(images))[:batches * batch_size]
    last = max(model.layers.index(layer) for layer in norms)  # nothing after the last batch norm is needed
    dropping = [layer for layer in model.layers[:last] if dropout and isinstance(layer, keras.layers.Dropout)
                and layer.rate > 0]
    for layer in dropping:
        if layer.noise_shape is not None:
            raise NormtfError(f"precise statistics with dropout on draw a mask per element; {layer.name} has "
                              f"a noise_shape ({layer.noise_shape})")
    keys = mask_keys(seed, [model.layers.index(layer) for layer in dropping], batches)  # (layers, batches, 2)
    masks = {id(layer): (i, min(round(layer.rate * 2**32), 2**32 - 1))  # its keys' row, its threshold (Dropout.mask_key)
             for i, layer in enumerate(dropping)}
    ids = {id(layer) for layer in norms}
    per_call = batch_size * max(1, CHUNK // batch_size)

    def gather(inputs: np.ndarray, entry: int, targets: list, keep: bool) -> np.ndarray | None:
        """One pass: `inputs` (the batches in order) into model.layers[entry], up to the last of
        `targets`; their statistics, set. With `keep`, the last target's inputs, for a later pass."""
        walk = model.layers[entry:model.layers.index(targets[-1]) + 1]
        wanted = {id(layer) for layer in targets}

        @tf.function(input_signature=[tf.TensorSpec((None, *inputs.shape[1:]), tf.float32),
                                      tf.TensorSpec((len(dropping), None, 2), tf.int32)])
        def forward(x, keys):
            from normtf.dropout import keep_masks

            statistics = []
            for layer in walk:
                if id(layer) in ids:
                    kept = x
                    x, mean, variance = _batch_norm(layer, x, batch_size, renorm)
                    if id(layer) in wanted:
                        statistics.append((mean, variance))
                elif id(layer) in masks:
                    row, threshold = masks[id(layer)]
                    shape = tf.concat([[batch_size], tf.shape(x)[1:]], 0)  # one batch's
                    x = x * tf.reshape(keep_masks(shape, x.dtype, keys[row], threshold), tf.shape(x))
                else:
                    x = layer(x, training=False)
            return statistics, (kept if keep else ())

        totals = [np.zeros((2, layer.moving_mean.shape[-1])) for layer in targets]  # sum of means, of variance + mean^2
        outputs = []
        for start in range(0, len(inputs), per_call):
            first = start // batch_size
            statistics, kept = forward(inputs[start:start + per_call], keys[:, first:first + per_call // batch_size])
            for total, (mean, variance) in zip(totals, statistics):
                mean, variance = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
                total += [mean.sum(axis=0), (variance + mean**2).sum(axis=0)]
            if keep:
                outputs.append(np.asarray(kept, np.float32))
        for layer, (sum_mean, sum_square) in zip(targets, totals):
            mean = sum_mean / batches
            variance = np.maximum(sum_square / batches - mean**2, 0)  # >= 0 exactly; rounding may dip below
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(variance.astype(np.float32))
        return np.concatenate(outputs) if keep else None

    inputs, entry = np.asarray(images, np.float32)[order], 0  # what a pass starts from, and where it enters
    if renorm is None:
        gather(inputs, entry, norms, keep=False)  # batch norm's training output reads no statistics: one pass
        return len(norms)
    for layer in norms:  # renorm's r and d read the earlier layers' new statistics: each layer in turn
        keep = layer is not norms[-1] and _input_bytes(layer, len(inputs)) <= CACHE_BYTES
        kept = gather(inputs, entry, [layer], keep)
        if keep:  # later passes start here, layer's statistics set: the layers before it are not run again
            inputs, entry = kept, model.layers.index(layer)
    return len(norms)


def _input_bytes(layer, count: int) -> float:
    """The bytes of `count` float32 inputs of this layer; infinite where its input's shape is unknown."""
    try:
        return 4 * count * math.prod(layer.input.shape[1:])
    except (AttributeError, ValueError, TypeError):
        return math.inf


def mask_keys(seed: int, places: list[int], batches: int) -> np.ndarray:
    """The dropout keys of precise_statistics(dropout=True): for the dropout layer at each of
    `places` (its index in the model), two int32 seed words per batch, from (seed, place) alone."""
    return np.array([np.random.default_rng([seed, place]).integers(0, 2**31 - 1, (batches, 2), dtype=np.int32)
                     for place in places], np.int32).reshape(len(places), batches, 2)


def _batch_norm(layer, x, batch_size: int, renorm: tuple[float, float] | None = None):
    """The batch-norm layer's training-time output for x, each group of batch_size consecutive
    images normalized by its own statistics (with `renorm`'s (rmax, dmax), corrected by batch
    renormalization's r and d against the layer's moving statistics, as normtf.renorm trains);
    and those (K groups, C channels) means and biased
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
    gamma = ops.cast(layer.gamma, "float32") if layer.scale else 1.0
    beta = ops.cast(layer.beta, "float32") if layer.center else 0.0
    if renorm is None:  # as normtf.fused_norms computes it
        out = centered * (ops.rsqrt(variance + layer.epsilon) * gamma) + beta
    else:  # as normtf.renorm computes it
        r_max, d_max = renorm
        sigma = ops.sqrt(ops.cast(layer.moving_variance, "float32") + layer.epsilon)
        r = ops.clip(ops.sqrt(variance + layer.epsilon) / sigma, 1.0 / r_max, r_max)
        d = ops.clip((mean - ops.cast(layer.moving_mean, "float32")) / sigma, -d_max, d_max)
        out = (centered * (r * ops.rsqrt(variance + layer.epsilon)) + d) * gamma + beta
    return ops.cast(ops.reshape(out, shape), layer.compute_dtype), mean[:, 0, 0], variance[:, 0, 0]
