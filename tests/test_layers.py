"""normtf.layers against the Keras layers they replace, on real MNIST activations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from normtf import data as mnist
from normtf import layers as ours
from normtf.models import build_model
from normtf.norms import EPS

PAIRS = {  # name: (Keras's layer, ours), each made with the given dtype policy
    "batch": (lambda d: keras.layers.BatchNormalization(momentum=0.9, epsilon=EPS, dtype=d),
              lambda d: ours.BatchNormalization(momentum=0.9, epsilon=EPS, dtype=d)),
    "group": (lambda d: keras.layers.GroupNormalization(groups=2, epsilon=EPS, dtype=d),
              lambda d: ours.GroupNormalization(groups=2, epsilon=EPS, dtype=d)),
    "layer-c": (lambda d: keras.layers.GroupNormalization(groups=1, epsilon=EPS, dtype=d),
                lambda d: ours.GroupNormalization(groups=1, epsilon=EPS, dtype=d)),
    "group-7": (lambda d: keras.layers.GroupNormalization(groups=7, epsilon=EPS, dtype=d),
                lambda d: ours.GroupNormalization(groups=7, epsilon=EPS, dtype=d)),
    "layer": (lambda d: keras.layers.LayerNormalization(axis=(1, 2, 3), epsilon=EPS, dtype=d),
              lambda d: ours.LayerNormalization(axis=(1, 2, 3), epsilon=EPS, dtype=d)),
}


@pytest.fixture(scope="module")
def activations(dataset):
    """What a norm layer sees in the model: conv + ReLU of 128 real test images, 14 channels."""
    conv = keras.layers.Conv2D(14, 3, use_bias=False, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    return tf.nn.relu(conv(mnist.normalized(dataset.x_test[:128])))


def _run(layer, x, weights, upstream):
    """Output, input/gamma/beta gradients of sum(output * upstream), and batch norm's moving
    statistics after the step, all as float64 arrays."""
    layer.build(x.shape)
    layer.gamma.assign(weights[0].astype(layer.gamma.dtype))
    layer.beta.assign(weights[1].astype(layer.beta.dtype))
    x = tf.cast(x, layer.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
        loss = tf.reduce_sum(y * tf.cast(upstream, y.dtype))
    results = [y, *tape.gradient(loss, [x, layer.gamma, layer.beta]), *layer.non_trainable_weights]
    return [np.asarray(r, np.float64) for r in results]


@pytest.mark.parametrize("name", PAIRS)
def test_as_accurate_as_keras_against_float64(name, activations):
    """Against Keras's layer computed in float64, ours in float32 is within float32 rounding:
    no further off than twice Keras's own float32 layer, or 1e-5 of the largest value (output,
    gradients, moving statistics). Not bit-equal to Keras's: both round, in different orders
    (our sums over pixels are matrix products, Keras's are reductions)."""
    make_keras, make_ours = PAIRS[name]
    rng = np.random.default_rng(0)
    shape = make_keras("float32")
    shape.build(activations.shape)
    weights = [rng.normal(1, 0.3, shape.gamma.shape), rng.normal(0, 0.3, shape.beta.shape)]
    upstream = rng.normal(size=activations.shape)
    truth = _run(make_keras("float64"), activations, weights, upstream)
    theirs = _run(make_keras("float32"), activations, weights, upstream)
    mine = _run(make_ours("float32"), activations, weights, upstream)
    for what, t, a, b in zip(["output", "d input", "d gamma", "d beta", "moving mean", "moving variance"],
                             truth, theirs, mine):
        keras_error, our_error = np.abs(a - t).max(), np.abs(b - t).max()
        assert our_error <= max(2 * keras_error, 1e-5 * np.abs(t).max()), (what, our_error, keras_error)


def test_batch_norm_inference_is_keras(activations):
    reference, mine = PAIRS["batch"][0]("float32"), PAIRS["batch"][1]("float32")
    for layer in (reference, mine):
        layer(activations, training=True)
        layer.moving_mean.assign(np.linspace(0, 1, 14))
        layer.moving_variance.assign(np.linspace(1, 2, 14))
    np.testing.assert_array_equal(reference(activations, training=False), mine(activations, training=False))


@pytest.mark.parametrize("name", ["batch", "group", "layer"])
def test_mixed_float16_keeps_float16_output_and_matches(name, activations):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        reference, mine = PAIRS[name][0](None), PAIRS[name][1](None)
        x = tf.cast(activations, tf.float16)
        args = {"training": True} if name == "batch" else {}
        reference.build(x.shape)
        mine.build(x.shape)
        a, b = reference(x, **args), mine(x, **args)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert b.dtype == tf.float16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2)


def test_dropout_drops_its_rate_and_keeps_the_mean(activations):
    layer = ours.Dropout(0.1, seed=3)
    x = tf.ones((128, 24, 24, 28))
    y = layer(x, training=True).numpy()
    kept_scale = 2**16 / (2**16 - round(0.1 * 2**16))
    assert set(np.unique(y)) == {0.0, np.float32(kept_scale)}
    dropped = (y == 0).mean()
    assert abs(dropped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / y.size)  # within 4 sigma of the rate
    assert abs(y.mean() - 1.0) < 4 * kept_scale * np.sqrt(0.1 * 0.9 / y.size)
    np.testing.assert_array_equal(layer(activations, training=False), activations)  # inference: identity


def test_dropout_gradient_is_the_mask():
    layer = ours.Dropout(0.3, seed=5)
    x = tf.constant(np.random.default_rng(1).normal(size=(16, 10, 10, 13)).astype("float32"))  # odd channels
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        total = tf.reduce_sum(y)
    grad = tape.gradient(total, x).numpy()
    np.testing.assert_allclose(grad * x.numpy(), y.numpy(), rtol=1e-6)
    assert 0.2 < (grad == 0).mean() < 0.4


def test_dropout_mask_is_set_by_the_seed_generator_state():
    """Training reseeds each dropout layer per epoch through its seed generator's state."""
    a, b = ours.Dropout(0.1, seed=1), ours.Dropout(0.1, seed=2)
    x = tf.ones((8, 6, 6, 12))
    assert not np.array_equal(a(x, training=True), b(x, training=True))
    for layer in (a, b):
        layer.seed_generator.state.assign(np.array([7, 9], dtype=layer.seed_generator.state.dtype))
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))


def test_dropout_with_noise_shape_is_keras_dropout():
    x = tf.ones((4, 5, 5, 6))
    y = ours.Dropout(0.5, noise_shape=(4, 1, 1, 6), seed=1)(x, training=True).numpy()
    assert (y == y[:, :1, :1, :]).all()  # one decision per (sample, channel)


@pytest.mark.parametrize("norm", ["batch-l1", "group", "layer"])
def test_saved_model_loads_safely_and_predicts_the_same(norm, tmp_path, test_batch):
    model = build_model(norm)
    model(test_batch, training=True)  # moves batch norm's statistics off their initial values
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_array_equal(loaded.predict(test_batch, verbose=0), model.predict(test_batch, verbose=0))
