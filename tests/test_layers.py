"""normtf's layers (normtf.dropout, normtf.fused_norms, normtf.fused_blocks) against the Keras layers
they replace, on real MNIST activations."""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from normtf import data
from normtf import dropout, fused_norms
from normtf.models import build_model, norm_layers
from normtf.config import TrainConfig
from normtf.norms import NORMS
from normtf.norms import EPS

PAIRS = {  # name: (Keras's layer, ours), each made with the given dtype policy
    "batch": (lambda d: keras.layers.BatchNormalization(momentum=0.9, epsilon=EPS, dtype=d),
              lambda d: fused_norms.BatchNormalization(momentum=0.9, epsilon=EPS, dtype=d)),
    "group": (lambda d: keras.layers.GroupNormalization(groups=2, epsilon=EPS, dtype=d),
              lambda d: fused_norms.GroupNormalization(groups=2, epsilon=EPS, dtype=d)),
    "layer-c": (lambda d: keras.layers.GroupNormalization(groups=1, epsilon=EPS, dtype=d),
                lambda d: fused_norms.GroupNormalization(groups=1, epsilon=EPS, dtype=d)),
    "group-7": (lambda d: keras.layers.GroupNormalization(groups=7, epsilon=EPS, dtype=d),
                lambda d: fused_norms.GroupNormalization(groups=7, epsilon=EPS, dtype=d)),
    "layer": (lambda d: keras.layers.LayerNormalization(axis=(1, 2, 3), epsilon=EPS, dtype=d),
              lambda d: fused_norms.LayerNormalization(axis=(1, 2, 3), epsilon=EPS, dtype=d)),
}


@pytest.fixture(scope="module")
def activations(dataset):
    """What a norm layer sees in the model: conv + ReLU of 128 real test images, 14 channels."""
    conv = keras.layers.Conv2D(14, 3, use_bias=False, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    return tf.nn.relu(conv(data.normalized(dataset.x_test[:128], dataset.mean, dataset.std)))


def _run(layer, x, weights, upstream, jit=None):
    """Output, input/gamma/beta gradients of sum(output * upstream), and batch norm's moving
    statistics after the step, all as float64 arrays. Eager, or in tf.function(jit_compile=jit)."""
    layer.build(x.shape)
    layer.gamma.assign(weights[0].astype(layer.gamma.dtype))
    layer.beta.assign(weights[1].astype(layer.beta.dtype))
    x, upstream = tf.cast(x, layer.compute_dtype), tf.cast(upstream, layer.compute_dtype)

    def step(x, upstream):  # upstream an argument: a captured constant is folded into the graph, slowly
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
            loss = tf.reduce_sum(y * upstream)
        return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

    run = step if jit is None else tf.function(step, jit_compile=jit)
    results = [*run(x, upstream), *layer.non_trainable_weights]
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


@pytest.mark.parametrize("jit", [None, True], ids=["eager", "xla"])
def test_batch_norm_matches_float64_at_a_large_batch(jit, dataset):
    """Batch norm of block 1 at batch 2,000 (1.35 M values a channel) in float32, against the
    float64 formulas. One float32 sum along all of a channel's values drifted: the variance came
    out 1.4% off and the output and gradients up to 5e-3 (of their largest value); under XLA the
    mean was 8e-3 standard deviations off. Keras's own float32 layer is as far off. Summed per
    sample first, then over the samples, the statistics are within 7e-6 and the rest 4e-6."""
    conv = keras.layers.Conv2D(14, 3, use_bias=False, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    x = tf.nn.relu(conv(data.normalized(dataset.x_train[:2000], dataset.mean, dataset.std)))
    rng = np.random.default_rng(0)
    gamma, beta = rng.normal(1, 0.3, 14), rng.normal(0, 0.3, 14)
    upstream = rng.normal(size=x.shape).astype(np.float32)
    layer = fused_norms.BatchNormalization(momentum=0.0, epsilon=EPS)  # momentum 0: the moving statistics are the batch's
    y, dx, dgamma, dbeta, mean, variance = _run(layer, x, [gamma, beta], upstream, jit)

    x = np.asarray(x, np.float64)
    true_mean = x.mean(axis=(0, 1, 2))
    x -= true_mean
    true_variance = np.square(x).mean(axis=(0, 1, 2))
    x *= 1 / np.sqrt(true_variance + EPS)  # normalized
    np.testing.assert_allclose(variance, true_variance, rtol=1e-4)
    np.testing.assert_allclose((mean - true_mean) / np.sqrt(true_variance), 0, atol=1e-4)  # in standard deviations
    true_dbeta, true_dgamma = upstream.sum(axis=(0, 1, 2), dtype=np.float64), np.einsum("nhwc,nhwc->c", upstream, x)
    true_dx = gamma / np.sqrt(true_variance + EPS) * (upstream - (true_dbeta + x * true_dgamma) / (x.size // 14))
    for what, got, truth in [("output", y, x * gamma + beta), ("d input", dx, true_dx),
                             ("d gamma", dgamma, true_dgamma), ("d beta", dbeta, true_dbeta)]:
        assert np.abs(got - truth).max() <= 1e-5 * np.abs(truth).max(), what


def test_batch_norm_inference_is_keras_to_one_rounding(activations):
    """Inference is x * a + (beta - mean * a) as Keras computes it (tf.nn.batch_normalization), in
    one XLA pass: XLA fuses the product and the sum (one rounding where TensorFlow's two ops
    round twice), so the output is within one float32 rounding of Keras's and no further from
    the exact value (float64)."""
    reference, mine = PAIRS["batch"][0]("float32"), PAIRS["batch"][1]("float32")
    gamma = np.random.default_rng(0).normal(1, 0.3, 14)
    for layer in (reference, mine):
        layer(activations, training=True)
        layer.moving_mean.assign(np.linspace(0, 1, 14))
        layer.moving_variance.assign(np.linspace(1, 2, 14))
        layer.gamma.assign(gamma)
    a = np.asarray(reference(activations, training=False), np.float64)
    b = np.asarray(mine(activations, training=False), np.float64)
    gamma, beta = (np.asarray(w, np.float64) for w in (mine.gamma, mine.beta))
    scale = gamma / np.sqrt(np.linspace(1, 2, 14) + EPS)
    truth = np.asarray(activations, np.float64) * scale + (beta - np.linspace(0, 1, 14) * scale)
    np.testing.assert_allclose(b, a, rtol=0, atol=2 * np.spacing(np.float32(np.abs(a).max())))
    assert np.abs(b - truth).max() <= np.abs(a - truth).max()


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
    layer = dropout.Dropout(0.1, seed=3)
    x = tf.ones((128, 24, 24, 28))
    y = layer(x, training=True).numpy()
    kept_scale = 2**32 / (2**32 - round(0.1 * 2**32))
    assert set(np.unique(y)) == {0.0, np.float32(kept_scale)}
    dropped = (y == 0).mean()
    assert abs(dropped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / y.size)  # within 4 sigma of the rate
    assert abs(y.mean() - 1.0) < 4 * kept_scale * np.sqrt(0.1 * 0.9 / y.size)
    np.testing.assert_array_equal(layer(activations, training=False), activations)  # inference: identity


def _bits(seed, shape=(64, 24, 24, 28)):
    return dropout.random_bits(tf.constant(shape), tf.constant(seed, tf.int32)).numpy()


def test_random_bits_are_uniform_in_every_byte():
    """The mask's 32 bits per element: each of the four bytes takes its 256 values equally often
    (chi-square, 255 degrees of freedom: mean 255, sd 22.6; 400 is beyond 6 sd)."""
    bits = _bits([12345, 678])
    assert bits.dtype == np.uint32
    for byte in range(4):
        counts = np.bincount(((bits >> (8 * byte)) & 255).ravel(), minlength=256)
        expected = bits.size / 256
        assert ((counts - expected) ** 2 / expected).sum() < 400, byte


def _correlation(a, b):
    """Correlation of two drop masks (10% drop), and 5 standard errors of it under independence."""
    a, b = (a.ravel() < 0.1 * 2**32).astype(np.float64), (b.ravel() < 0.1 * 2**32).astype(np.float64)
    return np.corrcoef(a, b)[0, 1], 5 / np.sqrt(a.size)


@pytest.mark.parametrize("axis", [0, 1, 2, 3], ids=["sample", "row", "column", "channel"])
def test_random_bits_of_neighbours_are_independent(axis):
    """Neighbouring elements along every axis (consecutive indices for the channels, a row or a
    sample apart for the others) are dropped independently, and so are the low bits."""
    bits = _bits([2024, 11])
    head = np.take(bits, range(bits.shape[axis] - 1), axis=axis)
    tail = np.take(bits, range(1, bits.shape[axis]), axis=axis)
    r, bound = _correlation(head, tail)
    assert abs(r) < bound
    r, bound = _correlation((head & 0xFFFF) << 16, (tail & 0xFFFF) << 16)
    assert abs(r) < bound


@pytest.mark.parametrize("other", [[7, 8], [8, 9], [2**31 - 2, 9], [7, 2**31 - 2]],
                         ids=["word0+1", "word1+1", "word0-max", "word1-max"])
def test_random_bits_of_seeds_differing_in_one_word_are_independent(other):
    """Both seed words reach every element: seeds one apart in either word (what successive
    draws of a seed generator are not, but the worst case) give uncorrelated masks."""
    base = _bits([7, 9])
    changed = _bits(other)
    assert np.mean(base == changed) < 1e-4
    r, bound = _correlation(base, changed)
    assert abs(r) < bound


def test_dropout_masks_of_successive_steps_are_independent():
    """A dropout layer draws new seed words each call, as Keras's does: consecutive masks of one
    layer are uncorrelated."""
    layer = dropout.Dropout(0.1, seed=3)
    x = tf.ones((64, 24, 24, 28))
    first, second = (layer(x, training=True).numpy() == 0 for _ in range(2))
    r = np.corrcoef(first.ravel(), second.ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(first.size)


def test_dropout_gradient_is_the_mask():
    layer = dropout.Dropout(0.3, seed=5)
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
    a, b = dropout.Dropout(0.1, seed=1), dropout.Dropout(0.1, seed=2)
    x = tf.ones((8, 6, 6, 12))
    assert not np.array_equal(a(x, training=True), b(x, training=True))
    for layer in (a, b):
        layer.seed_generator.state.assign(np.array([7, 9], dtype=layer.seed_generator.state.dtype))
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))


def test_dropout_with_noise_shape_is_keras_dropout():
    x = tf.ones((4, 5, 5, 6))
    y = dropout.Dropout(0.5, noise_shape=(4, 1, 1, 6), seed=1)(x, training=True).numpy()
    assert (y == y[:, :1, :1, :]).all()  # one decision per (sample, channel)


@pytest.mark.parametrize("norm", ["batch-l1", "group", "layer"])
def test_saved_model_loads_safely_and_predicts_the_same(norm, tmp_path, test_batch):
    model = build_model(norm)
    model(test_batch, training=True)  # moves batch norm's statistics off their initial values
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_array_equal(loaded.predict(test_batch, verbose=0), model.predict(test_batch, verbose=0))


def _training_call(norm, x, fused: bool, jit: bool = False, policy: str = "float32"):
    """One training call of a fresh model of `norm` (weights and dropout seeds from seed 1), fused
    (the model's own call) or layer by layer (keras.Sequential's), in tf.function(jit_compile=jit):
    output, gradients of the input and every weight, and the state after it, as float64 arrays."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(1)
        model = build_model(norm)  # built: it starts with an Input
        upstream = tf.constant(np.random.default_rng(1).normal(size=(x.shape[0], 10)), tf.float32)
        call = model if fused else lambda x, training: keras.Sequential.call(model, x, training=training)

        @tf.function(jit_compile=jit)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.cast(call(x, training=True), tf.float32) * upstream)
            return tape.gradient(loss, [x, *model.trainable_weights]), call(x, training=True)

        grads, y = step(tf.cast(x, model.compute_dtype))
        return [np.asarray(tf.cast(t, tf.float64)) for t in [y, *grads, *model.non_trainable_weights]]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _kernels(fn, *args) -> list[str]:
    """The types of the kernels TensorFlow ran for one call of fn (a tf.function), from a profiler
    trace: what grappler made of the graph, which the traced graph does not show."""
    import glob
    import tempfile

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    fn(*args)  # traced and optimized outside the trace
    logdir = tempfile.mkdtemp()
    tf.profiler.experimental.start(logdir)
    try:
        fn(*args)
    finally:
        tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    names = [plane.event_metadata[event.metadata_id].name for plane in space.planes
             if plane.name.startswith("/host:CPU") for line in plane.lines for event in line.events]
    return [name.split(":")[-1] for name in names if ":" in name]  # a kernel's event is "op name:type"


@pytest.mark.parametrize("norm", NORMS)
def test_the_models_inference_fuses_each_relu_into_its_convolution(norm, dataset):
    """In inference, normtf's Sequential writes each ReLU after a bias-free convolution as
    relu(x + 0), which grappler's remapper fuses with the convolution into one kernel: six
    fused convolutions, no ReLU kernel left, and the output is the layers' one after another
    (keras.Sequential's call) to the bit."""
    x = tf.constant(data.normalized(dataset.x_test[:64], dataset.mean, dataset.std))
    model = build_model(norm)
    model(x, training=True)  # moves batch norm's statistics off their initial values
    fused = tf.function(lambda x: model(x, training=False))
    plain = tf.function(lambda x: keras.Sequential.call(model, x, training=False))
    np.testing.assert_array_equal(fused(x), plain(x))
    kernels = _kernels(fused, x)
    assert sum(kernel.endswith("FusedConv2D") for kernel in kernels) == 6, kernels
    assert "Relu" not in kernels
    assert _kernels(plain, x).count("Relu") == 6  # the check can fail


@pytest.mark.parametrize("norm", ["batch-l1", "group", "layer"])
def test_the_training_step_applies_each_relu_in_its_convolution(norm, dataset):
    """In training too, each block's ReLU runs inside its convolution (a fused convolution, as in
    inference) and its gradient inside the norm's backward expression: six fused convolutions in
    a step, and no ReLU or ReLU-gradient kernel (keras.Sequential's call, layer by layer, runs
    six of each: the check can fail). That the gradients are right is the test above."""
    x = tf.constant(data.normalized(dataset.x_test[:32], dataset.mean, dataset.std))
    model = build_model(norm)

    def step(call):
        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(call(x, training=True))
            return tape.gradient(loss, model.trainable_weights)
        return _kernels(run, x)

    fused = step(model)
    assert sum(kernel.endswith("FusedConv2D") for kernel in fused) == 6, fused
    assert not {"Relu", "ReluGrad"} & set(fused)
    plain = step(lambda x, training: keras.Sequential.call(model, x, training=training))
    assert plain.count("Relu") == plain.count("ReluGrad") == 6


@pytest.mark.parametrize("norm", [norm for norm, spec in NORMS.items()  # variants whose norm layer is one of ours
                                  if spec.make and hasattr(spec.make(TrainConfig(norm=norm)), "fused_call")])
def test_the_models_fused_training_pass_is_its_layers_one_after_another(norm, dataset):
    """normtf.fused_blocks.Sequential runs each ReLU -> norm -> Dropout as the norm layer's fused_call
    (relu=True, dropout's key) in training: six times a call, and what comes out (the output,
    every gradient, batch norm's moving statistics, the next masks) is the layers' own, one after
    another (measured: to the bit, in float32 on this machine)."""
    x = data.normalized(dataset.x_test[:32], dataset.mean, dataset.std)
    norm_class = type(norm_layers(build_model(norm))[0])
    with mock.patch.object(norm_class, "fused_call", autospec=True, side_effect=norm_class.fused_call) as fused_call:
        fused = _training_call(norm, x, fused=True)
    assert [c.kwargs["relu"] for c in fused_call.call_args_list] == [True] * 12  # 6 blocks, traced in 2 calls
    plain = _training_call(norm, x, fused=False)
    assert len(fused) == len(plain) > 20
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())


# Slow for every variant: the fast tier compiles batch-l1's whole step under XLA and mixed precision
# in tests/test_gpu_config.py.
@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch-l1", "group", "layer"])
def test_the_fused_training_pass_under_xla_and_mixed_precision(norm, dataset):
    """The GPU configuration, rehearsed: the fused blocks compile under XLA, where they equal the
    layers one after another compiled the same way to float32 rounding. (Against TensorFlow's
    own kernels, XLA's convolutions round differently and flip a few ReLUs near zero, either
    way.) Under mixed_float16 too, every result finite and no further from float32's than twice
    the layers' one after another (their mask is applied in float16, ours in float32; measured:
    output and gradients 5-13% off float32's in norm for either, the ratio up to 1.7)."""
    def off(results, reference):  # the largest relative distance, in norm, over all results
        return max(np.linalg.norm(r - a) / np.linalg.norm(a) for a, r in zip(reference, results) if np.any(a))

    x = data.normalized(dataset.x_test[:32], dataset.mean, dataset.std)
    plain, fused = (_training_call(norm, x, fused=f, jit=True) for f in (False, True))
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    plain_half, fused_half = (_training_call(norm, x, fused=f, jit=True, policy="mixed_float16") for f in (False, True))
    assert all(np.isfinite(r).all() for r in fused_half)
    assert off(fused_half, fused) <= 2 * off(plain_half, fused)


# XLA (the GPU configuration, rehearsed on CPU) and mixed precision. Each layer as the model makes
# it: (name, factory taking a dtype policy).
OURS = {
    "dropout": lambda d: dropout.Dropout(0.1, seed=3, dtype=d),
    "batch": PAIRS["batch"][1],
    "group-2": PAIRS["group"][1],
    "group-1": PAIRS["layer-c"][1],
    "layer": PAIRS["layer"][1],
}


def _compiled_step(make, x, jit: bool, policy: str = "float32"):
    """Output, gradients (input and weights) and state after one training call of a fresh layer
    inside tf.function(jit_compile=jit), as float64 arrays. Same weights, seed and upstream
    gradient every call."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = make(None)
        layer.build(x.shape)
        out_shape = layer.compute_output_shape(x.shape)
        upstream = tf.constant(np.random.default_rng(1).normal(size=out_shape), tf.float32)
        rng = np.random.default_rng(0)
        for w in layer.trainable_weights:
            w.assign(rng.normal(1 if w.name == "gamma" else 0, 0.3, w.shape).astype(w.dtype))

        @tf.function(jit_compile=jit)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, upstream.dtype) * upstream)
            return y, tape.gradient(loss, [x, *layer.trainable_weights])

        y, grads = step(tf.cast(x, layer.compute_dtype))
        assert y.dtype == layer.compute_dtype
        return [np.asarray(tf.cast(t, tf.float64)) for t in [y, *grads, *layer.non_trainable_weights]]
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def small_activations(activations):
    return activations[:32]


@pytest.mark.parametrize("name", OURS)
def test_xla_compiled_layer_equals_the_uncompiled_one(name, small_activations):
    """Forward and backward in float32 under XLA: what TensorFlow's own kernels give, to float32
    rounding (XLA sums in its own order); dropout draws the same mask. Every sum is over one
    sample's pixels (then, for batch norm, over the 32 samples), and the two agree to 5e-6 (of
    the largest value). When batch norm summed all 21,632 values of a channel at once they were
    8e-5 apart."""
    plain = _compiled_step(OURS[name], small_activations, jit=False)
    xla = _compiled_step(OURS[name], small_activations, jit=True)
    assert len(plain) == len(xla) >= 2
    for a, b in zip(plain, xla):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("jit", [False, True], ids=["eager-graph", "xla"])
@pytest.mark.parametrize("policy,tolerance", [("mixed_float16", 2e-2), ("mixed_bfloat16", 8e-2)])
@pytest.mark.parametrize("name", OURS)
def test_mixed_precision_layer_is_finite_and_close_to_float32(name, policy, tolerance, jit, small_activations):
    """Under a mixed policy the layer computes in float16/bfloat16 where Keras's would, its
    statistics in float32: finite, and within the half type's rounding of float32's results
    (relative to each result's largest value)."""
    full = _compiled_step(OURS[name], small_activations, jit=jit)
    half = _compiled_step(OURS[name], small_activations, jit=jit, policy=policy)
    for a, b in zip(full, half):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, rtol=0, atol=tolerance * np.abs(a).max())


def _op_types(jit: bool, layer, x) -> set[str]:
    fn = tf.function(lambda x: layer(x, training=True), jit_compile=jit)
    return {op.type for op in fn.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph.get_operations()}


@pytest.mark.parametrize("name", ["batch", "group-2", "group-1", "layer"])
def test_one_pass_sum_of_squares_except_under_xla(name, small_activations):
    """The fast path is taken where it can run: TensorFlow's one-pass euclidean-norm kernel without
    XLA, square-then-sum (which XLA fuses) in a trace XLA compiles. Guards xla.compiled_by_xla."""
    layer = OURS[name](None)
    layer.build(small_activations.shape)
    assert "EuclideanNorm" in _op_types(False, layer, small_activations)
    assert "EuclideanNorm" not in _op_types(True, layer, small_activations)
