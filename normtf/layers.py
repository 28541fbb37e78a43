"""Keras layers of our own, each a faster drop-in for a Keras layer and tested against it
(tests/test_layers.py), and a Sequential that fuses ReLU -> norm -> Dropout in training and each
ReLU into its convolution. The model uses these only where a profile showed the Keras layer's cost.
They stay a training detail: saved files name Keras's classes (save_model, with_our_classes)."""

from __future__ import annotations

import json
import math
import os
import zipfile

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="normtf")
class Dropout(keras.layers.Dropout):
    """keras.layers.Dropout whose mask is a keyed hash of each element's index, made by XLA.

    On CPU, most of Keras's dropout was the Philox generator producing one float per element
    (about 2.3 ns each), then passes to compare, cast and scale. Here one XLA-compiled call hashes
    each element's position with the layer's two seed words (`_random_bits`: two rounds of a
    32-bit integer hash), compares and scales, in one loop that writes the mask: for block 2's
    activations, forward and backward, 5.1-5.8 against 10.1-14.6 ms on one thread. The mask
    depends on the seed and the shape, not on the values, so TensorFlow's executor can make it
    beside other work; the products forward and backward are TensorFlow's, on every core. (One
    fused call for mask and product was faster alone but slower in the two-thread step: it sat
    on the critical path.) The drop probability is round(rate * 2^32) / 2^32 and kept elements
    are scaled by the exact inverse of the keep probability, so the layer is unbiased. Other
    backends fall back to Keras's own dropout.
    """

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        if self.noise_shape is not None or keras.backend.backend() != "tensorflow":  # Keras's own path
            return super().call(inputs, training=training)
        import tensorflow as tf

        return inputs * _xla(_keep)(tf.shape(inputs), tf.as_dtype(inputs.dtype), *self.mask_key())

    def mask_key(self):
        """This step's (seed words, threshold), from which _keep makes the mask; each call advances
        the layer's seed generator, as keras.random does. Sequential's fused blocks ask for it too,
        and make the same mask inside the norm layer's expressions."""
        seed = keras.random.randint((2,), 0, 2**31 - 1, seed=self.seed_generator)
        return seed, min(round(self.rate * 2**32), 2**32 - 1)  # drop an element when its 32 bits are below this


def _random_bits(shape, seed):
    """32 random bits per element of `shape`, from the element's index and two int32 seed words.

    A counter-based generator, as Philox is, with a cheaper round: the index (times the golden
    ratio, plus seed word 0) goes through lowbias32 (two multiplies, three xor-shifts; Chris
    Wellons' integer hash search), is xored with seed word 1 and goes through it again. For a
    fixed seed the map from index to bits is one-to-one; tests/test_layers.py checks the drop rate,
    neighbours along every axis, and masks of seeds that differ in one word for independence.
    Indices are 32-bit: one call covers up to 2^31 elements."""
    import tensorflow as tf

    def lowbias32(h):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
        h = h * tf.constant(0x7FEB352D, tf.uint32)
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(15, tf.uint32)))
        h = h * tf.constant(0x846CA68B, tf.uint32)
        return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))

    key = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    index = tf.bitcast(tf.range(tf.reduce_prod(shape), dtype=tf.int32), tf.uint32)
    h = lowbias32(index * tf.constant(0x9E3779B9, tf.uint32) + key[0])
    h = lowbias32(tf.bitwise.bitwise_xor(h, key[1]))
    return tf.reshape(h, shape)


def _keep(shape, dtype, seed, threshold):
    """Dropout's mask for `shape`: 0 where an element's bits fall below `threshold`, else
    2^32 / (2^32 - threshold), in `dtype`. Called through _xla: the hash, compare and select fuse
    into one loop that writes the mask (compiled per shape, dtype and threshold)."""
    import tensorflow as tf

    scale = 2**32 / (2**32 - threshold)
    return tf.where(_random_bits(shape, seed) >= tf.constant(threshold, tf.uint32),
                    tf.constant(scale, dtype), tf.constant(0, dtype))


_XLA = {}  # element-wise functions compiled by XLA, made on first use (TensorFlow is imported lazily)


def _xla(fn):
    """fn as one XLA-compiled call (TensorFlow only). XLA writes an element-wise expression in one
    loop over the elements where TensorFlow makes one pass per operation; on this CPU, reductions
    are what XLA does slowly, so only element-wise work goes through here. Inside a trace that XLA
    already compiles, the call is inlined there."""
    if fn not in _XLA:
        import tensorflow as tf

        _XLA[fn] = tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=False)
    return _XLA[fn]


def _dropped(t, keep):
    """t times dropout's mask of key `keep` (seed words, threshold: Dropout.mask_key), or t for
    None. Inside a fused expression the mask is made where it is used, never stored: the backward
    pass makes it again from the same key."""
    import tensorflow as tf

    return t if keep is None else t * _keep(tf.shape(t), t.dtype, *keep)


def _relu_grad(grad, x):  # grad, then ReLU's gradient for its input x (None: no ReLU)
    import tensorflow as tf

    return grad if x is None else tf.where(x > 0, grad, tf.zeros_like(grad))


def _scale_shift(centered, a, beta, keep=None):
    return _dropped(centered * a + beta, keep)


def _affine(x, a, b):
    return x * a + b


def _dropped_products(dy, centered, keep):
    """Dropout's backward product, and the product the norm's second sum needs, from one read."""
    dropped = _dropped(dy, keep)
    return dropped, dropped * centered


def _centered_grad(dy, centered, a, c_centered, c, x=None):
    return _relu_grad(dy * a - centered * c_centered - c, x)


def _layer_out(centered, inv, gamma, beta, keep=None):  # LayerNormalization's output
    return _dropped(centered * inv * gamma + beta, keep)


def _layer_products(dy, centered, inv, gamma, keep=None):
    """LayerNormalization's backward products, from one read of dy and centered: the gradient
    with respect to the normalized values, and the two products the sums need. With `keep`, dy
    is first dropout's backward product, and is returned first (beta's gradient sums it)."""
    dropped = _dropped(dy, keep)
    normalized = centered * inv
    d_normalized = dropped * gamma
    products = (d_normalized, dropped * normalized, d_normalized * normalized)
    return products if keep is None else (dropped, *products)


def _layer_centered_grad(d_normalized, centered, inv, mean_of_products, mean_of_d_normalized, x=None):
    return _relu_grad(inv * (d_normalized - centered * inv * mean_of_products - mean_of_d_normalized), x)


def _elementwise(fn, *args):
    """fn(*args) for the norm layers: one XLA call on TensorFlow (block 2's backward expression
    took 0.93 against 2.3 ms as TensorFlow's four ops, the forward one 0.85 against 1.6), the ops
    as they are on other backends."""
    return _xla(fn)(*args) if keras.backend.backend() == "tensorflow" else fn(*args)


def _normalize(x, groups: int, per_sample: bool, gamma, beta, epsilon: float, relu: bool = False, keep=None,
               relu_applied: bool = False):
    """(x - mean) / sqrt(var + eps) * gamma + beta for channels-last `x`, with statistics over each
    sample's `groups` channel groups (per_sample: group and layer norm) or over the whole batch per
    channel (batch norm: groups = channels). Returns the output, mean and variance (for batch norm
    one per channel, shaped (1, 1, C)). With `relu`, of relu(x), and the ReLU's gradient is part of
    this one (with `relu_applied`, x is already relu's output, made by _relu_into_conv, whose
    gradient passes through: only the gradient is applied here); with `keep` (Dropout.mask_key),
    the output times dropout's mask: Sequential's fused blocks.

    Why not Keras's: its moments and normalization are a dozen element-wise passes forward and
    more in the autodiff backward pass. Here the sums over pixels are matrix products with a ones
    vector (1.6x as fast as reduce_sum for few channels), sums of squares one fused
    reduction, one group's statistics stay per-sample scalars (a (B, 1, 1) operand broadcasts over
    the activations at about half the cost of a (B, 1, C) one), and the backward pass is the
    closed-form gradient, whose element-wise expression (like the output's) is one XLA loop
    (_elementwise). The variance is two-pass, over x - mean: E[x^2] - E[x]^2 would save a pass
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
        out = _elementwise(_scale_shift, centered, a, beta, keep)

        def grad(*args, upstream=None):
            dy = upstream if upstream is not None else args[0]
            if keep is None:
                products = dy * centered
            else:  # from here on, dy is the gradient with respect to the norm's output
                dy, products = _elementwise(_dropped_products, dy, centered, keep)
            s1, s2 = sum_over_pixels(dy), sum_over_pixels(products)
            d_source = _elementwise(_centered_grad, dy, centered, a, inv**3 * group_mean(gamma * s2),
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
    if keras.backend.backend() != "tensorflow" or _compiled_by_xla():
        return ops.sum(ops.square(t), axis=axis, keepdims=True)
    import tensorflow as tf

    return ops.square(tf.math.reduce_euclidean_norm(t, axis=axis, keepdims=True))


def _compiled_by_xla() -> bool:
    """Whether the graph being traced will be compiled by XLA (tf.function(jit_compile=True), as
    Keras's compile(jit_compile=True) makes it). TensorFlow marks such a trace with an XLA control
    flow context and its own ops ask this same private helper (no public API says it); should it
    move, every trace is taken as XLA's: always compilable, at the one-pass op's speed cost.
    tests/test_layers.py checks both answers on real traces."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:
        return True
    return not tf.executing_eagerly() and GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


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
        as tf.nn.batch_normalization computes it, in one pass (_elementwise) where TensorFlow makes
        two: for the 10k-image evaluation, block 1 and 2's products and sums took 185 ms."""
        x = ops.cast(inputs, "float32")
        a = ops.rsqrt(ops.cast(self.moving_variance, "float32") + self.epsilon) * ops.cast(self.gamma, "float32")
        b = ops.cast(self.beta, "float32") - ops.cast(self.moving_mean, "float32") * a
        return ops.cast(_elementwise(_affine, x, a, b), self.compute_dtype)

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
            out = _elementwise(_layer_out, centered, inv, gamma, beta, keep)

            def grad(*args, upstream=None):
                dy = upstream if upstream is not None else args[0]
                products = _elementwise(_layer_products, dy, centered, inv, gamma, keep)
                if keep is not None:  # from here on, dy is the gradient with respect to the norm's output
                    dy, products = products[0], products[1:]
                d_normalized, d_gamma_terms, normalized_products = products
                d_source = _elementwise(_layer_centered_grad, d_normalized, centered, inv, row_mean(normalized_products),
                                        row_mean(d_normalized), rows if relu else None)
                return d_source, column_sum(d_gamma_terms), column_sum(dy)

            return out, grad

        return ops.cast(ops.reshape(normalize(source, gamma, beta), ops.shape(inputs)), self.compute_dtype)


@keras.saving.register_keras_serializable(package="normtf")
class Sequential(keras.Sequential):
    """keras.Sequential whose training step runs each ReLU -> norm -> Dropout of normtf's layers
    as one function (the norm layer's fused_call): statistics of relu(x), dropout's mask made
    inside the norm's output expression and made again inside its backward one (never stored),
    ReLU's gradient inside the norm's. A block makes 18 passes over its activations instead of 25;
    outputs and gradients are the layers' own, one after another (tests/test_layers.py: to float32
    rounding; measured here: to the bit). The mask is hashed inside the norm's expressions because
    made apart and read there it cost more than it saved (docs/speed.md).
    A ReLU after a convolution without bias, in training and in inference, is relu(x + 0) with a
    BiasAdd (_relu_into_conv): TensorFlow's graph optimizer (grappler's remapper) fuses Conv2D ->
    BiasAdd -> Relu into one oneDNN convolution that applies the ReLU as it writes, so the ReLU's
    own pass goes (adding zero changes no value). Anything else is Keras's own, layer by layer;
    saved files name keras.Sequential."""

    def call(self, inputs, training=None, mask=None, **kwargs):
        if (mask is not None or kwargs or keras.backend.backend() != "tensorflow"
                or keras.backend.is_keras_tensor(inputs)):
            return super().call(inputs, training=training, mask=mask, **kwargs)
        x, layers, i = inputs, self.layers, 0
        while i < len(layers):
            after_conv = i > 0 and _conv_without_bias(layers[i - 1])
            if training and _fusable(layers[i:i + 3], x):
                relu, norm, dropout = layers[i:i + 3]
                if after_conv:  # ReLU applied by the convolution, its gradient by the norm's
                    x = norm.fused_call(_relu_into_conv(x, gradient=False), relu=True, relu_applied=True,
                                        keep=dropout.mask_key())
                else:
                    x = norm.fused_call(x, relu=True, keep=dropout.mask_key())
                i += 3
                continue
            if not training and after_conv and _plain_relu(layers[i]):
                x = _relu_into_conv(x)
            else:
                x = layers[i](x) if training is None else layers[i](x, training=training)
            i += 1
        return x


def _relu_into_conv(x, gradient: bool = True):
    """relu(x) written as relu(x + 0) with a BiasAdd, the pattern grappler fuses into the
    convolution that made x. For the 10k-image evaluation the ReLUs of blocks 1 and 2 took 65 ms;
    the fused convolutions take what the convolutions alone took (block 2 at batch 1000: 25.3
    against 25.1 ms, 29.8 as two ops; docs/speed.md). Without `gradient`, the
    gradient passes through unmasked, for a norm layer whose backward expression applies the
    ReLU's gradient (fused_call with relu_applied): no ReluGrad pass, and the fusion still holds
    (a custom gradient does not add a consumer of the convolution's output)."""
    import tensorflow as tf

    if not gradient:
        @tf.custom_gradient
        def relu_passing_gradient(t):
            return _relu_into_conv(t), lambda upstream: upstream

        return relu_passing_gradient(x)

    key = (x.shape[-1], x.dtype)
    if key not in _ZEROS:  # made eagerly, so a trace captures it as an input: grappler would fold a constant zero away
        with tf.init_scope():
            _ZEROS[key] = tf.zeros((x.shape[-1],), x.dtype)
    return tf.nn.relu(tf.nn.bias_add(x, _ZEROS[key]))


_ZEROS = {}


def _plain_relu(layer) -> bool:
    return type(layer) is keras.layers.ReLU and layer.max_value is None and not layer.negative_slope and not layer.threshold


def _conv_without_bias(layer) -> bool:
    return (isinstance(layer, keras.layers.Conv2D) and not layer.use_bias
            and layer.activation is keras.activations.linear)


def _fusable(block, x) -> bool:
    """Whether `block` is a plain ReLU, a norm layer of ours that fused_call computes for x in
    training, and our Dropout with a mask to make."""
    if len(block) != 3:
        return False
    relu, norm, dropout = block
    return (_plain_relu(relu) and type(norm) in (BatchNormalization, GroupNormalization, LayerNormalization)
            and norm.fusable(x) and type(dropout) is Dropout and dropout.rate > 0 and dropout.noise_shape is None)


# Model files: normtf's layers are a training detail. A saved model.keras names Keras's own classes,
# so any Keras 3 loads it without normtf (safe mode included), with the same config and weights.
OURS = {cls.__name__: cls for cls in (Dropout, BatchNormalization, GroupNormalization, LayerNormalization)}


def save_model(model, path) -> None:
    """model.save(path), then with_keras_classes(path): every model.keras normtf writes. Renaming
    in the written file, rather than saving a copy of the model built from Keras's classes, keeps
    what Keras wrote (weights, optimizer state) byte for byte, and is the same step that converts
    an older file. A layer that holds more than the Keras layer its inference is (batch
    renormalization's step counter, weight standardization's raw kernel) says which layer to save
    in its place (`saved_as()`); a model with one is saved as such a copy, without optimizer state
    (it belongs to weights the file does not hold)."""
    if any(hasattr(layer, "saved_as") for layer in model.layers):
        model = keras.Sequential([keras.Input(model.input_shape[1:], name=model._layers[0].name),
                                  *[layer.saved_as() if hasattr(layer, "saved_as") else layer for layer in model.layers]],
                                 name=model.name)
    model.save(path)
    with_keras_classes(path)


def with_keras_classes(path) -> bool:
    """Rewrite a .keras file in place so that it names Keras's classes where it names normtf's
    (`normtf>GroupNormalization` -> keras.layers.GroupNormalization, `normtf>Sequential` ->
    keras.Sequential; each of ours is a subclass with the same config and variables). Only
    config.json changes: the weights, the optimizer state and the metadata are copied byte for byte. Also converts a file that an older
    normtf wrote (it names normtf's classes, so needs normtf to load). Returns whether it renamed
    anything."""
    def rename(node) -> int:
        if isinstance(node, list):
            return sum(rename(item) for item in node)
        if not isinstance(node, dict):
            return 0
        count = sum(rename(value) for value in node.values())
        name = node.get("registered_name")
        if isinstance(name, str) and name.startswith("normtf>"):
            name = name[len("normtf>"):]
            # any layer Keras has, not only OURS: a model built by normtf on 2026-11-26 and saved
            # by model.save itself names normtf's Conv2D, a layer since removed
            module = "keras" if name == "Sequential" else "keras.layers" if hasattr(keras.layers, name) else None
            if module:
                node.update(module=module, class_name=name, registered_name=None)
                count += 1
        return count

    with zipfile.ZipFile(path) as source:
        config = json.loads(source.read("config.json"))
        if not rename(config):
            return False
        partial = f"{path}.converting"
        try:
            with zipfile.ZipFile(partial, "w") as target:
                for info in source.infolist():
                    data = json.dumps(config).encode() if info.filename == "config.json" else source.read(info)
                    target.writestr(info, data)
        except BaseException:
            os.unlink(partial)
            raise
    os.replace(partial, path)  # the file is the old one or the converted one, never half of either
    return True


def with_our_classes(model):
    """The model with normtf's layers in place of the Keras layers they replace (the inverse of
    with_keras_classes), same config and weights, as normtf's Sequential: normtf evaluates a loaded
    file at its own layers' speed, and to what it computed when training. Keras's
    GroupNormalization made the 10k-image evaluation of a group-norm model 1.8x as slow. Other
    models than Sequential ones (normtf's are) are returned as they are."""
    return _clone_with(model, {getattr(keras.layers, name): cls for name, cls in OURS.items()}, Sequential)


def with_keras_layers(model, names=None):
    """The model with Keras's own layers in place of normtf's (all, or those of OURS's `names`),
    same config and weights, as a keras.Sequential: what normtf's layers are measured against
    (`normtf bench --against keras-layers`, or keras-Dropout etc. for one class)."""
    return _clone_with(model, {cls: getattr(keras.layers, name) for name, cls in OURS.items()
                               if names is None or name in names}, keras.Sequential)


def _clone_with(model, classes: dict, sequential):
    """A copy of a Sequential model as class `sequential`, whose layers of a class in `classes`
    are made by its value."""
    if not isinstance(model, keras.Sequential) or (
            type(model) is sequential and not any(type(layer) in classes for layer in model.layers)):
        return model
    copy = keras.models.clone_model(
        model, clone_function=lambda layer: classes.get(type(layer), type(layer)).from_config(layer.get_config()))
    if type(copy) is not sequential:
        copy = sequential(copy._layers, name=copy.name)  # _layers: the input layer too
    copy.set_weights(model.get_weights())
    return copy
