"""Dropout whose mask is a keyed hash of each element's index: a drop-in for keras.layers.Dropout,
faster on CPU, tested against it (tests/test_layers.py). The mask is made by one XLA call where
XLA compiles (normtf.xla) and by the same operations one by one where it cannot: the same mask.
normtf's fused blocks (normtf.fused_blocks) make it again inside the norm layers' expressions from
the key the layer hands out (`Dropout.mask_key`)."""

from __future__ import annotations

import keras

from normtf import xla


@keras.saving.register_keras_serializable(package="normtf")
class Dropout(keras.layers.Dropout):
    """keras.layers.Dropout whose mask is a keyed hash of each element's index, made by XLA.

    On CPU, most of Keras's dropout was the Philox generator producing one float per element
    (about 2.3 ns each), then passes to compare, cast and scale. Here one XLA-compiled call hashes
    each element's position with the layer's two seed words (`random_bits`: two rounds of a
    32-bit integer hash), compares and scales, in one loop that writes the mask: for block 2's
    activations, forward and backward, 5.1-5.8 against 10.1-14.6 ms on one thread. The mask
    depends on the seed and the shape, not on the values, so TensorFlow's executor can make it
    beside other work; the products forward and backward are TensorFlow's, on every core. (One
    fused call for mask and product was faster alone but slower in the two-thread step: it sat
    on the critical path.) The drop probability is round(rate * 2^32) / 2^32 and kept elements
    are scaled by the exact inverse of the keep probability, so the layer is unbiased. Where XLA
    cannot compile, the same hash runs as TensorFlow's integer ops, one pass each: the same mask,
    bit for bit, more slowly (tests/test_without_xla.py). Other backends fall back to Keras's own
    dropout.
    """

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        if self.noise_shape is not None or keras.backend.backend() != "tensorflow":  # Keras's own path
            return super().call(inputs, training=training)
        import tensorflow as tf

        return inputs * xla.compiled(keep_mask)(tf.shape(inputs), tf.as_dtype(inputs.dtype), *self.mask_key())

    def mask_key(self):
        """This step's (seed words, threshold), from which keep_mask makes the mask; each call
        advances the layer's seed generator, as keras.random does. Sequential's fused blocks ask
        for it too, and make the same mask inside the norm layer's expressions."""
        seed = keras.random.randint((2,), 0, 2**31 - 1, seed=self.seed_generator)
        return seed, min(round(self.rate * 2**32), 2**32 - 1)  # drop an element when its 32 bits are below this


def random_bits(shape, seed):
    """32 random bits per element of `shape`, from the element's index and two int32 seed words.

    A counter-based generator, as Philox is, with a cheaper round: the index (times the golden
    ratio, plus seed word 0) goes through lowbias32 (two multiplies, three xor-shifts; Chris
    Wellons' integer hash search), is xored with seed word 1 and goes through it again. For a
    fixed seed the map from index to bits is one-to-one; tests/test_layers.py checks the drop rate,
    neighbours along every axis, and masks of seeds that differ in one word for independence.
    Indices are 32-bit: one call covers up to 2^31 elements."""
    import tensorflow as tf

    key = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    index = tf.bitcast(tf.range(tf.reduce_prod(shape), dtype=tf.int32), tf.uint32)
    return tf.reshape(_hashed(index, key[0], key[1]), shape)


def _hashed(index, word0, word1):
    """random_bits' two rounds of lowbias32 over uint32 indices, with seed words that broadcast
    against them."""
    import tensorflow as tf

    def lowbias32(h):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
        h = h * tf.constant(0x7FEB352D, tf.uint32)
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(15, tf.uint32)))
        h = h * tf.constant(0x846CA68B, tf.uint32)
        return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))

    h = lowbias32(index * tf.constant(0x9E3779B9, tf.uint32) + word0)
    return lowbias32(tf.bitwise.bitwise_xor(h, word1))


def keep_mask(shape, dtype, seed, threshold):
    """Dropout's mask for `shape`: 0 where an element's bits fall below `threshold`, else
    2^32 / (2^32 - threshold), in `dtype`. Called through xla.compiled: the hash, compare and
    select fuse into one loop that writes the mask (compiled per shape, dtype and threshold)."""
    import tensorflow as tf

    scale = 2**32 / (2**32 - threshold)
    return tf.where(random_bits(shape, seed) >= tf.constant(threshold, tf.uint32),
                    tf.constant(scale, dtype), tf.constant(0, dtype))


def keep_masks(shape, dtype, seeds, threshold):
    """Masks of several batches at once: row k of the (K, *shape) result is keep_mask(shape,
    dtype, seeds[k], threshold), from seeds of shape (K, 2). What a training step draws for its
    batch, for K batches in one call (normtf.precise_bn gathers statistics with dropout on so)."""
    import tensorflow as tf

    keys = tf.bitcast(tf.cast(seeds, tf.int32), tf.uint32)  # (K, 2)
    index = tf.bitcast(tf.range(tf.reduce_prod(shape), dtype=tf.int32), tf.uint32)
    bits = _hashed(index[None, :], keys[:, :1], keys[:, 1:])  # (K, elements of one batch)
    scale = 2**32 / (2**32 - threshold)
    mask = tf.where(bits >= tf.constant(threshold, tf.uint32), tf.constant(scale, dtype), tf.constant(0, dtype))
    return tf.reshape(mask, tf.concat([tf.shape(seeds)[:1], tf.cast(shape, tf.int32)], 0))


def dropped(t, keep):
    """t times dropout's mask of key `keep` (seed words, threshold: Dropout.mask_key), or t for
    None. Inside a fused expression the mask is made where it is used, never stored: the backward
    pass makes it again from the same key."""
    import tensorflow as tf

    return t if keep is None else t * keep_mask(tf.shape(t), t.dtype, *keep)
