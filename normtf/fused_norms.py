"""Batch, group and layer normalization written out for speed: drop-ins for Keras's layers, same
weights and results (tests/test_layers.py), faster on CPU. Their statistics are sums as matrix
products, their backward pass is the closed-form gradient, and every element-wise expression
forward and backward is one XLA call where XLA compiles (normtf.xla; TensorFlow's ops where it
cannot). Each layer's `fused_call` also takes the ReLU before it and the dropout after it into
those expressions: normtf.fused_blocks runs a model's ReLU -> norm -> Dropout through it."""

from __future__ import annotations

import math

import keras
from keras import ops

from normtf import xla
from normtf.dropout import dropped


def _relu_grad(grad, x):  # grad, then ReLU's gradient for its input x (None: no ReLU)
    import tensorflow as tf

    return grad if x is None else tf.where(x > 0, grad, tf.zeros_like(grad))


def _scale_shift(centered, a, beta, keep=None):
    return dropped(centered * a + beta, keep)


def _affine(x, a, b):
    return x * a + b


def _dropped_products(dy, centered, keep):
    """Dropout's backward product, and the product the norm's second sum needs, from one read."""
    d_output = dropped(dy, keep)
    return d_output, d_output * centered


def _centered_grad(dy, centered, a, c_centered, c, x=None):
    return _relu_grad(dy * a - centered * c_centered - c, x)


def _layer_out(centered, inv, gamma, beta, keep=None):  # LayerNormalization's output
    return dropped(centered * inv * gamma + beta, keep)


def _layer_products(dy, centered, inv, gamma, keep=None):
    """LayerNormalization's backward products, from one read of dy and centered: the gradient
    with respect to the normalized values, and the two products the sums need. With `keep`, dy
    is first dropout's backward product, and is returned first (beta's gradient sums it)."""
    d_output = dropped(dy, keep)
    normalized = centered * inv
    d_normalized = d_output * gamma
    products = (d_normalized, d_output * normalized, d_normalized * normalized)
    return products if keep is None else (d_output, *products)


def _layer_centered_grad(d_normalized, centered, inv, mean_of_products, mean_of_d_normalized, x=None):
    return _relu_grad(inv * (d_normalized - centered * inv * mean_of_products - mean_of_d_normalized), x)


def _normalize(x, groups: int, per_sample: bool, gamma, beta, epsilon: float, relu: bool = False, keep=None,
               relu_applied: bool = False):
    """(x - mean) / sqrt(var + eps) * gamma + beta for channels-last `x`, with statistics over each
    sample's `groups` channel groups (per_sample: group and layer norm) or over the whole batch per
    channel (batch norm: groups = channels). Returns the output, mean and variance (for batch norm
    one per channel, shaped (1, 1, C)). With `relu`, of relu(x), and the ReLU's gradient is part of
    this one (with `relu_applied`, x is already relu's output, made by
    fused_blocks.relu_into_conv, whose gradient passes through: only the gradient is applied here); with `keep` (Dropout.mask_key),
    the output times dropout's mask: Sequential's fused blocks.

    Why not Keras's: its moments and normalization are a dozen element-wise passes forward and
    more in the autodiff backward pass. Here the sums over pixels are matrix products with a ones
    vector (1.6x as fast as reduce_sum for few channels), sums of squares one fused
    reduction, one group's statistics stay per-sample scalars (a (B, 1, 1) operand broadcasts over
    the activations at about half the cost of a (B, 1, C) one), and the backward pass is the
    closed-form gradient, whose element-wise expression (like the output's) is one XLA loop
    (xla.elementwise). The variance is two-pass, over x - mean: E[x^2] - E[x]^2 would save a pass
    but lost 1e-4 to cancellation in tests.
    Every sum is over one sample's pixels (at most H*W values); batch norm then adds the N
    partial sums. One float32 sum over all N*H*W values of a channel drifts with its length, as
    Keras's layer does: block 1's variances came out 1.4% off at batch 2,000 and 6% at 10,000,
    where the two-level sums stay within 1e-5, no slower at batch 128."""
    channels = x.shape[-1]
    source = ops.reshape(x, (ops.shape(x)[0], -1, channels))  # (N, K, C)
    rows = ops.stop_gradient(ops.relu(source) if relu and not relu_applied else source)  # the gradient is scale_shift's
    samples, pixels = ops.shape(rows)[0], ops.shape(rows)[1]
    count = pixels * (channels // groups) * (1 if per_sample else samples)  # elements behind one statistic

    def over_samples(t):  # (N, 1, C) per-sample sums -> (B, 1, C): B = N per sample, 1 for batch norm
        return t if per_sample else ops.sum(t, axis=0, keepdims=True)

    def sum_over_pixels(t):  # (N, K, C) -> (B, 1, C)
        return over_samples(ops.matmul(ops.ones((ops.shape(t)[0], 1, ops.shape(t)[1]), t.dtype), t))

    def group_mean(t):  # (B, 1, C) per-channel sums -> per-group means: (B, 1, 1) for one group, else
        b = ops.shape(t)[0]  # broadcast back to (B, 1, C)
        if groups == 1:
            return ops.sum(t, axis=-1, keepdims=True) / ops.cast(count, t.dtype)
        sums = ops.sum(ops.reshape(t, (b, groups, channels // groups)), axis=-1, keepdims=True)
        return ops.reshape(ops.broadcast_to(sums, (b, groups, channels // groups)), (b, 1, channels)) / ops.cast(count, t.dtype)

    if per_sample and groups == 1:  # one statistic per sample: reductions along each sample's contiguous row are cheapest
        mean = ops.reshape(ops.mean(ops.reshape(rows, (samples, -1)), axis=1), (samples, 1, 1))
        centered = rows - mean
        squares = _sum_of_squares(ops.reshape(centered, (samples, -1)), axis=1)
        variance = ops.reshape(squares, (samples, 1, 1)) / ops.cast(count, x.dtype)
    else:
        mean = group_mean(sum_over_pixels(rows))
        centered = rows - mean
        variance = group_mean(over_samples(_sum_of_squares(centered, axis=1)))
    inv = ops.rsqrt(variance + epsilon)

    @ops.custom_gradient
    def scale_shift(source, gamma, beta):
        # Everything above is a constant to autodiff (stop_gradient): the gradient with respect to
        # `source` is written out here, the statistics' dependence on x (and ReLU's) included.
        a = gamma * inv
        out = xla.elementwise(_scale_shift, centered, a, beta, keep)

        def grad(*args, upstream=None):
            dy = upstream if upstream is not None else args[0]
            if keep is None:
                products = dy * centered
            else:  # from here on, dy is the gradient with respect to the norm's output
                dy, products = xla.elementwise(_dropped_products, dy, centered, keep)
            s1, s2 = sum_over_pixels(dy), sum_over_pixels(products)
            d_source = xla.elementwise(_centered_grad, dy, centered, a, inv**3 * group_mean(gamma * s2),
                                    inv * group_mean(gamma * s1), rows if relu else None)
            return d_source, ops.sum(s2 * inv, axis=(0, 1)), ops.sum(s1, axis=(0, 1))

        return out, grad

    out = ops.reshape(scale_shift(source, gamma, beta), ops.shape(x))
    return out, mean, variance


def _sum_of_squares(t, axis: int):
    """Sum of squares along `axis`, kept as a size-1 axis. TensorFlow's euclidean-norm reduction
    squares and sums in one pass, where square-then-sum writes the squares and reads them back:
    for the six blocks' activations, 2.4 against 3.0 ms at batch 128, 7.9 against 12.9 ms at the
    evaluation's batch of 1000. XLA has no euclidean-norm kernel (on any device), but it fuses
    square-then-sum into one pass itself: so that is what a trace being compiled by XLA gets."""
    if keras.backend.backend() != "tensorflow" or xla.compiled_by_xla():
        return ops.sum(ops.square(t), axis=axis, keepdims=True)
    import tensorflow as tf

    return ops.square(tf.math.reduce_euclidean_norm(t, axis=axis, keepdims=True))


@keras.saving.register_keras_serializable(package="normtf")
class BatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization with a faster training step (see _normalize) and inference
    in one pass (inference_call); the options the study does not use (sync, renorm, masks, other
    axes) are Keras's own."""

    def call(self, inputs, training=None, mask=None):
        if mask is not None or not self._plain(inputs):
            return super().call(inputs, training=training, mask=mask)
        return self.fused_call(inputs) if training and self.trainable else self.inference_call(inputs)

    def inference_call(self, inputs):
        """Keras's inference output, x * a + (beta - mean * a) with a = gamma / sqrt(variance + eps)
        as tf.nn.batch_normalization computes it, in one pass (xla.elementwise) where TensorFlow makes
        two: for the 10k-image evaluation, block 1 and 2's products and sums took 185 ms."""
        x = ops.cast(inputs, "float32")
        a = ops.rsqrt(ops.cast(self.moving_variance, "float32") + self.epsilon) * ops.cast(self.gamma, "float32")
        b = ops.cast(self.beta, "float32") - ops.cast(self.moving_mean, "float32") * a
        return ops.cast(xla.elementwise(_affine, x, a, b), self.compute_dtype)

    def fusable(self, inputs) -> bool:
        """Whether fused_call computes this layer for `inputs` in training (else Keras's code does)."""
        return self.trainable and self._plain(inputs)

    def _plain(self, inputs) -> bool:  # the settings the study uses, which this class computes itself
        return (not self.synchronized and not getattr(self, "renorm", False) and self.scale and self.center
                and self.axis in (-1, len(inputs.shape) - 1))

    def fused_call(self, inputs, relu: bool = False, keep=None, relu_applied: bool = False):
        """The training step's output, of relu(inputs) if `relu`, with dropout's mask of key `keep`
        applied to it if given (Sequential's fused blocks; relu_applied: see _normalize); updates
        the moving statistics."""
        x = ops.cast(inputs, "float32")  # statistics in float32 under mixed precision, as Keras
        channels = x.shape[-1]
        out, mean, variance = _normalize(x, channels, False, ops.cast(self.gamma, "float32"),
                                         ops.cast(self.beta, "float32"), self.epsilon, relu, keep, relu_applied)
        mean, variance = ops.reshape(mean, (channels,)), ops.reshape(variance, (channels,))
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="normtf")
class GroupNormalization(keras.layers.GroupNormalization):
    """keras.layers.GroupNormalization (groups=1: layer norm with per-channel gamma/beta), faster
    in training and inference (see _normalize); other axes and options are Keras's own."""

    def call(self, inputs):
        if not self.fusable(inputs):
            return super().call(inputs)
        return self.fused_call(inputs)

    def fusable(self, inputs) -> bool:
        return self.scale and self.center and self.axis in (-1, len(inputs.shape) - 1)

    def fused_call(self, inputs, relu: bool = False, keep=None, relu_applied: bool = False):  # as BatchNormalization's
        x = ops.cast(inputs, "float32")
        out, _, _ = _normalize(x, self.groups, True, ops.cast(self.gamma, "float32"),
                               ops.cast(self.beta, "float32"), self.epsilon, relu, keep, relu_applied)
        return ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="normtf")
class LayerNormalization(keras.layers.LayerNormalization):
    """keras.layers.LayerNormalization over all of a sample's features with element-wise gamma and
    beta (PyTorch's LayerNorm([C, H, W])), written like _normalize; other settings are Keras's own."""

    def call(self, inputs):
        if not self.fusable(inputs):
            return super().call(inputs)
        return self.fused_call(inputs)

    def fusable(self, inputs) -> bool:
        axes = sorted(a % len(inputs.shape) for a in self.axis)
        return axes == list(range(1, len(inputs.shape))) and not self.rms_scaling and self.scale and self.center

    def fused_call(self, inputs, relu: bool = False, keep=None, relu_applied: bool = False):  # as BatchNormalization's
        x = ops.cast(inputs, "float32")
        size = math.prod(inputs.shape[1:])
        source = ops.reshape(x, (-1, size))  # (N, D)
        rows = ops.stop_gradient(ops.relu(source) if relu and not relu_applied else source)  # the gradient is normalize's
        gamma = ops.reshape(ops.cast(self.gamma, "float32"), (1, size))
        beta = ops.reshape(ops.cast(self.beta, "float32"), (1, size))
        ones_d = ops.ones((size, 1))

        def row_mean(t):  # (N, D) -> (N, 1)
            return ops.matmul(t, ones_d) / size

        def column_sum(t):  # (N, D) -> (D,)
            return ops.reshape(ops.matmul(ops.ones((1, ops.shape(t)[0])), t), (size,))

        centered = rows - row_mean(rows)
        inv = ops.rsqrt(_sum_of_squares(centered, axis=1) / size + self.epsilon)

        @ops.custom_gradient
        def normalize(source, gamma, beta):
            out = xla.elementwise(_layer_out, centered, inv, gamma, beta, keep)

            def grad(*args, upstream=None):
                dy = upstream if upstream is not None else args[0]
                products = xla.elementwise(_layer_products, dy, centered, inv, gamma, keep)
                if keep is not None:  # from here on, dy is the gradient with respect to the norm's output
                    dy, products = products[0], products[1:]
                d_normalized, d_gamma_terms, normalized_products = products
                d_source = xla.elementwise(_layer_centered_grad, d_normalized, centered, inv, row_mean(normalized_products),
                                        row_mean(d_normalized), rows if relu else None)
                return d_source, column_sum(d_gamma_terms), column_sum(dy)

            return out, grad

        return ops.cast(ops.reshape(normalize(source, gamma, beta), ops.shape(inputs)), self.compute_dtype)
