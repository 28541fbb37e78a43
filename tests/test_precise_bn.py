"""normtf.precise_bn: the recomputed batch-norm statistics against NumPy, with dropout off and on
(its masks made again by a NumPy hash), behind batch renormalization's r and d; models without
batch norm untouched, and a trained model evaluated with them."""

import keras
import numpy as np
import pytest

from normtf import data, precise_bn
from normtf.config import TrainConfig
from normtf.errors import NormtfError, UsageError
from normtf.evaluation import load_model
from normtf.dropout import Dropout
from normtf.fused_norms import BatchNormalization
from normtf.model_files import save_model
from normtf.models import build_model, norm_layers
from normtf.norms import EPS
from normtf.training import compile_model


def small_model(dropout: float | None = None):
    """Conv(no bias) -> BN -> ReLU -> [Dropout] -> Conv(bias) -> BN, with random weights, and
    random moving statistics that a correct pass never reads."""
    rng = np.random.default_rng(7)
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(3, 3, use_bias=False, name="conv1"),
        BatchNormalization(epsilon=EPS, name="bn1"),
        keras.layers.ReLU(),
        *([Dropout(dropout, seed=1)] if dropout is not None else []),
        keras.layers.Conv2D(2, 3, name="conv2"),
        BatchNormalization(epsilon=EPS, name="bn2"),
    ])
    model.set_weights([rng.normal(0.5, 1.0, w.shape).astype(np.float32) if "variance" not in w.path
                       else rng.uniform(0.5, 3.0, w.shape).astype(np.float32) for w in model.weights])
    return model


def conv(x, kernel, bias=0.0):
    """'valid' 2-D convolution, channels-last, in float64."""
    kh, kw = kernel.shape[:2]
    out = np.zeros((x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1, kernel.shape[3]))
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("nijc,co->nijo", x[:, a:a + out.shape[1], b:b + out.shape[2]], kernel[a, b])
    return out + bias


def numpy_bits(count, key):
    """normtf.dropout.random_bits of indices 0..count-1 and two seed words, in NumPy's uint32
    arithmetic: two rounds of lowbias32."""
    def lowbias32(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    word0, word1 = np.asarray(key, np.int32).view(np.uint32)
    h = lowbias32(np.arange(count, dtype=np.uint32) * np.uint32(0x9E3779B9) + word0)
    return lowbias32(h ^ word1)


def numpy_mask(shape, key, rate):
    """Dropout's mask for one batch: kept elements scaled by 2^32 / (2^32 - threshold)."""
    threshold = round(rate * 2**32)
    bits = numpy_bits(int(np.prod(shape)), key).reshape(shape)
    return np.where(bits >= threshold, 2**32 / (2**32 - threshold), 0.0)


def expected_statistics(model, images, batch_size, seed, rate=None, renorm=None):
    """Both layers' population (mean, variance), by NumPy alone: bn2's input built batch by batch
    with bn1 normalizing by that batch's own statistics (with `renorm`'s (rmax, dmax), corrected by
    r and d against bn1's population statistics), then with `rate`, times that batch's dropout
    mask; each then over all activations seen."""
    w = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]: np.asarray(v, np.float64) for v in model.weights}
    batches = len(images) // batch_size
    order = np.random.default_rng(seed).permutation(len(images))[:batches * batch_size]
    keys = precise_bn.mask_keys(seed, [3], batches)[0]  # the dropout layer is model.layers[3]
    c1 = conv(images[order].astype(np.float64), w["conv1/kernel"])
    inputs2 = []
    for k, batch in enumerate(np.split(c1, batches)):
        mean, var = batch.mean(axis=(0, 1, 2)), batch.var(axis=(0, 1, 2))
        normalized = (batch - mean) / np.sqrt(var + EPS)
        if renorm:  # against bn1's new statistics: its population's, all its activations
            sigma = np.sqrt(c1.reshape(-1, c1.shape[-1]).var(0) + EPS)
            r = np.clip(np.sqrt(var + EPS) / sigma, 1 / renorm[0], renorm[0])
            d = np.clip((mean - c1.reshape(-1, c1.shape[-1]).mean(0)) / sigma, -renorm[1], renorm[1])
            normalized = normalized * r + d
        activated = np.maximum(normalized * w["bn1/gamma"] + w["bn1/beta"], 0)
        if rate:
            activated = activated * numpy_mask(activated.shape, keys[k], rate)
        inputs2.append(conv(activated, w["conv2/kernel"], w["conv2/bias"]))
    c2 = np.concatenate(inputs2)
    return [(c.reshape(-1, c.shape[-1]).mean(0), c.reshape(-1, c.shape[-1]).var(0)) for c in (c1, c2)]


def written(model):
    return [(np.asarray(model.get_layer(name).moving_mean), np.asarray(model.get_layer(name).moving_variance))
            for name in ("bn1", "bn2")]


@pytest.mark.parametrize("batch_size, chunk", [(4, 1024), (4, 4), (3, 1024), (1, 5)])
def test_statistics_match_numpy(batch_size, chunk, monkeypatch):
    """11 images: whole batches only (the 2 or 3 left over are not used), one call or one per
    batch (chunk), and at batch 1 each image's statistics alone."""
    monkeypatch.setattr(precise_bn, "CHUNK", chunk)
    images = np.random.default_rng(0).normal(size=(11, 6, 6, 1)).astype(np.float32)
    model = small_model()
    assert precise_bn.precise_statistics(model, images, batch_size, seed=3) == 2
    for (mean, var), (want_mean, want_var) in zip(written(model), expected_statistics(model, images, batch_size, 3)):
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-6)


def test_dropout_is_off():
    """A Dropout(0.5) before bn2 changes nothing: the statistics are the test-time network's."""
    images = np.random.default_rng(1).normal(size=(16, 6, 6, 1)).astype(np.float32)
    with_dropout, without = small_model(dropout=0.5), small_model()
    precise_bn.precise_statistics(with_dropout, images, 4)
    precise_bn.precise_statistics(without, images, 4)
    for got, want in zip(written(with_dropout), written(without)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_numpy_hash_is_normtfs():
    """numpy_bits, which the references below mask with, is normtf.dropout.random_bits; and
    keep_masks makes keep_mask's mask for each key of a batch of keys."""
    import tensorflow as tf

    from normtf import dropout

    keys = np.array([[5, -7], [2**31 - 1, 0], [123456, 654321]], np.int32)
    for key in keys:
        np.testing.assert_array_equal(dropout.random_bits(tf.constant([2, 3, 4]), tf.constant(key)).numpy().ravel(),
                                      numpy_bits(24, key))
    threshold = round(0.3 * 2**32)
    masks = dropout.keep_masks(tf.constant([2, 3, 4]), tf.float32, tf.constant(keys), threshold).numpy()
    assert masks.shape == (3, 2, 3, 4)
    for mask, key in zip(masks, keys):
        np.testing.assert_array_equal(mask, dropout.keep_mask(tf.constant([2, 3, 4]), tf.float32, key, threshold))
        np.testing.assert_allclose(mask, numpy_mask((2, 3, 4), key, 0.3), rtol=1e-7)


@pytest.mark.parametrize("batch_size, chunk", [(4, 1024), (4, 4), (3, 1024), (2, 6)])
def test_statistics_with_dropout_on_match_numpy(batch_size, chunk, monkeypatch):
    """With dropout on, each batch is masked by its own key (seed, the layer's place, the batch's
    number), as a training step masks its batch: the same statistics whether a call runs one
    batch or several (chunk), NumPy's to float32's precision; and not dropout off's."""
    monkeypatch.setattr(precise_bn, "CHUNK", chunk)
    images = np.random.default_rng(0).normal(size=(14, 6, 6, 1)).astype(np.float32)
    model = small_model(dropout=0.4)
    assert precise_bn.precise_statistics(model, images, batch_size, seed=5, dropout=True) == 2
    expected = expected_statistics(model, images, batch_size, 5, rate=0.4)
    for (mean, var), (want_mean, want_var) in zip(written(model), expected):
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-6)
    off = expected_statistics(model, images, batch_size, 5)
    np.testing.assert_allclose(off[0][1], expected[0][1])  # bn1's input comes before the dropout
    assert not np.allclose(off[1][1], expected[1][1], rtol=0.01)  # bn2's after it


def test_dropout_on_is_reproducible_and_off_at_rate_zero():
    images = np.random.default_rng(3).normal(size=(16, 6, 6, 1)).astype(np.float32)
    first, again, other = small_model(dropout=0.5), small_model(dropout=0.5), small_model(dropout=0.5)
    precise_bn.precise_statistics(first, images, 4, seed=1, dropout=True)
    precise_bn.precise_statistics(again, images, 4, seed=1, dropout=True)
    precise_bn.precise_statistics(other, images, 4, seed=2, dropout=True)
    np.testing.assert_array_equal(np.concatenate(written(first)[1]), np.concatenate(written(again)[1]))
    assert not np.allclose(np.concatenate(written(first)[1]), np.concatenate(written(other)[1]))
    zero, off = small_model(dropout=0.0), small_model()
    precise_bn.precise_statistics(zero, images, 4, dropout=True)
    precise_bn.precise_statistics(off, images, 4)
    for got, want in zip(written(zero), written(off)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("dropout, cache", [(False, True), (True, True), (True, False)])
def test_batch_renormalization_gathers_behind_r_and_d(dropout, cache, monkeypatch):
    """With renorm's limits, bn1 outputs renorm's training output, r and d against its new
    statistics, clipped to (rmax, dmax) = (1.1, 0.07) (these inputs clip some channels' r and d and not
    others): bn2's statistics are NumPy's for that, whatever bn1's moving statistics were, and
    differ from plain batch norm's; at the warm-up's limits (1, 0) they are batch norm's. The same
    whether bn2's pass starts from bn1's inputs kept from bn1's pass (cache) or from the images."""
    if not cache:
        monkeypatch.setattr(precise_bn, "CACHE_BYTES", 0)
    monkeypatch.setattr(precise_bn, "CHUNK", 8)  # two calls a pass: the kept inputs are put together in order
    images = np.random.default_rng(4).normal(size=(16, 6, 6, 1)).astype(np.float32)
    model, plain, warm_up = small_model(dropout=0.2), small_model(dropout=0.2), small_model(dropout=0.2)
    expected = expected_statistics(model, images, 4, 6, rate=0.2 if dropout else None, renorm=(1.1, 0.07))
    precise_bn.precise_statistics(model, images, 4, seed=6, dropout=dropout, renorm=(1.1, 0.07))
    for (mean, var), (want_mean, want_var) in zip(written(model), expected):
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-6)
    precise_bn.precise_statistics(plain, images, 4, seed=6, dropout=dropout)
    assert not np.allclose(written(plain)[1][1], written(model)[1][1], rtol=0.01)
    precise_bn.precise_statistics(warm_up, images, 4, seed=6, dropout=dropout, renorm=(1.0, 0.0))
    for got, want in zip(written(warm_up), written(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_batch_renorm_runs_limits_are_its_schedules_at_its_last_step():
    """The sweep's budget, 2 epochs of 20,000 images: 314 steps at batch 128, all warm-up (batch
    norm's pass); 1,250 at batch 32; 20,000 at batch 2, past both limits. No limits for batch norm."""
    from normtf.evaluation import renorm_limits

    config = TrainConfig(norm="batch-renorm", epochs=2, train_size=20_000)
    assert renorm_limits(config.replace(batch_size=128), 20_000) == (1.0, 0.0)
    np.testing.assert_allclose(renorm_limits(config.replace(batch_size=32), 20_000),
                               [1 + 2 * 749 / 3500, 5 * 749 / 2000], rtol=1e-6)
    assert renorm_limits(config.replace(batch_size=2), 20_000) == (3.0, 5.0)
    assert renorm_limits(config.replace(norm="batch"), 20_000) is None


def test_frozen_batch_norm_keeps_its_statistics():
    """A batch-norm layer trained frozen normalized with its moving statistics, and still does:
    untouched, and the next layer's statistics computed with them."""
    images = np.random.default_rng(2).normal(size=(12, 6, 6, 1)).astype(np.float32)
    model = small_model()
    model.get_layer("bn1").trainable = False
    before = written(model)[0]
    assert precise_bn.precise_statistics(model, images, 4) == 1
    np.testing.assert_array_equal(written(model)[0], before)
    x = keras.Sequential(model.layers[:4])(images[np.random.default_rng(0).permutation(12)], training=False)
    channels = np.asarray(x, np.float64).reshape(-1, 2)
    np.testing.assert_allclose(written(model)[1], [channels.mean(0), channels.var(0)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_models_without_batch_norm_are_untouched(norm):
    model = build_model(norm)
    before = model.get_weights()
    images = np.random.default_rng(3).normal(size=(8, 28, 28, 1)).astype(np.float32)
    assert precise_bn.precise_statistics(model, images, 4) == 0
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_bad_batch_sizes_are_one_line_errors():
    images = np.zeros((3, 6, 6, 1), np.float32)
    with pytest.raises(UsageError, match="positive whole number"):
        precise_bn.precise_statistics(small_model(), images, 0)
    with pytest.raises(NormtfError, match="at least one batch of 4 images; got 3"):
        precise_bn.precise_statistics(small_model(), images, 4)


@pytest.mark.slow
def test_trained_model_evaluates_well_with_precise_statistics(tmp_path):
    """build_model("batch") trained 60 steps, saved and loaded as `normtf evaluate` loads it, its
    moving statistics then set to garbage: precise statistics from 2,048 training images bring
    the accuracy on 1,000 test images back to at least the moving averages' (within 1 point), and
    are the same on the model as built and as loaded."""
    mnist = data.load("mnist")
    train = data.normalized(mnist.x_train[:2048], mnist.mean, mnist.std)
    test = data.normalized(mnist.x_test[:1000], mnist.mean, mnist.std)
    keras.utils.set_random_seed(0)
    config = TrainConfig(norm="batch", batch_size=32)
    model = compile_model(build_model("batch", config), config, jit=False, steps_per_epoch=60)
    model.fit(train[:1920], mnist.y_train[:1920], batch_size=32, epochs=1, verbose=0)

    def accuracy(m):
        return float((m.predict(test, batch_size=1000, verbose=0).argmax(1) == mnist.y_test[:1000]).mean())

    save_model(model, tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    moving = accuracy(loaded)
    rng = np.random.default_rng(4)
    for layer in norm_layers(loaded):
        layer.moving_mean.assign(rng.normal(0, 3, layer.moving_mean.shape))
        layer.moving_variance.assign(rng.uniform(0.01, 10, layer.moving_variance.shape))
    garbage = accuracy(loaded)
    assert precise_bn.precise_statistics(loaded, train, 32) == 6
    precise = accuracy(loaded)
    assert precise >= moving - 0.01 and precise > garbage + 0.2, (moving, garbage, precise)

    precise_bn.precise_statistics(model, train, 32)
    for ours, theirs in zip(norm_layers(model), norm_layers(loaded)):
        np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance, rtol=1e-6)
        np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, rtol=1e-6, atol=1e-7)
