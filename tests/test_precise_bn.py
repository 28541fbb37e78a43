"""normtf.precise_bn: the recomputed batch-norm statistics against NumPy, dropout off, models
without batch norm untouched, and a trained model evaluated with them."""

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


def expected_statistics(model, images, batch_size, seed):
    """Both layers' population (mean, variance), by NumPy alone: bn2's input built batch by batch
    with bn1 normalizing by that batch's own statistics; each then over all activations seen."""
    w = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]: np.asarray(v, np.float64) for v in model.weights}
    batches = len(images) // batch_size
    order = np.random.default_rng(seed).permutation(len(images))[:batches * batch_size]
    c1 = conv(images[order].astype(np.float64), w["conv1/kernel"])
    inputs2 = []
    for batch in np.split(c1, batches):
        mean, var = batch.mean(axis=(0, 1, 2)), batch.var(axis=(0, 1, 2))
        normalized = (batch - mean) / np.sqrt(var + EPS) * w["bn1/gamma"] + w["bn1/beta"]
        inputs2.append(conv(np.maximum(normalized, 0), w["conv2/kernel"], w["conv2/bias"]))
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
