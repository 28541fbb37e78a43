"""Batch renormalization (normtf.renorm) against a float64 NumPy computation of Ioffe's algorithm 1:
outputs, gradients (r and d held constant, as the paper's stop-gradient), moving statistics, the
rmax/dmax schedule, its step counter across a checkpoint, and the plain batch norm a file holds."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from normtf import renorm
from normtf.config import TrainConfig
from normtf.errors import Interrupted
from normtf.model_files import save_model
from normtf.models import build_model, norm_layers
from normtf.norms import EPS
from normtf.training import train
from numeric import central_difference

MOVING_MEAN, MOVING_VARIANCE = np.array([0.5, -3.0]), np.array([4.0, 0.01])


def reference(x, gamma, beta, r_max, d_max, r=None, d=None):
    """Algorithm 1 in float64 (biased batch variance, as Keras's batch norm); r and d computed
    unless given (held constant for the gradient)."""
    x = x.astype(np.float64)
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    sigma_b, sigma = np.sqrt(variance + EPS), np.sqrt(MOVING_VARIANCE + EPS)
    if r is None:
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mean - MOVING_MEAN) / sigma, -d_max, d_max)
    return gamma * ((x - mean) / sigma_b * r + d) + beta, r, d


def layer_at(step: int, shape=(4, 3, 3, 2)):
    layer = renorm.BatchRenormalization(momentum=0.9, epsilon=EPS)
    layer.build(shape)
    layer.gamma.assign([1.5, 0.5])
    layer.beta.assign([0.1, -0.2])
    layer.moving_mean.assign(MOVING_MEAN)
    layer.moving_variance.assign(MOVING_VARIANCE)
    layer.step.assign(step)
    return layer


def inputs(shape=(4, 3, 3, 2)):
    return (np.random.default_rng(1).normal(size=shape) * [1.0, 2.0] + [0.0, 1.0]).astype(np.float32)


@pytest.mark.parametrize("step, r_max, d_max", [(0, 1, 0), (499, 1, 0), (500, 1, 0), (1_000, 1 + 2 * 500 / 3500, 1.25),
                                                (2_500, 1 + 2 * 2000 / 3500, 5), (4_000, 3, 5), (9_380, 3, 5)])
def test_the_schedule_is_the_papers_divided_by_ten(step, r_max, d_max):
    limits = renorm.BatchRenormalization().limits(step)
    np.testing.assert_allclose([float(v) for v in limits], [r_max, d_max], rtol=1e-6)


@pytest.mark.parametrize("step", [0, 3_000])  # warm-up (batch norm); relaxed, with channel 2's r and d clipped
def test_training_output_and_moving_statistics_are_the_papers(step):
    x = inputs()
    layer = layer_at(step)
    r_max, d_max = (float(v) for v in layer.limits(step))
    expected, r, d = reference(x, layer.gamma.numpy(), layer.beta.numpy(), r_max, d_max)
    if step:  # the check can fail: channel 2 is clipped, channel 1 not
        assert r[1] == r_max and d[1] == d_max and 1 / r_max < r[0] < r_max and abs(d[0]) < d_max
    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-5, atol=1e-5)
    mean, variance = x.astype(np.float64).mean(axis=(0, 1, 2)), x.astype(np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.9 * MOVING_MEAN + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 * MOVING_VARIANCE + 0.1 * variance, rtol=1e-5)
    assert layer.step.numpy() == step + 1


@pytest.mark.parametrize("step", [0, 3_000])
def test_gradients_are_the_papers_with_r_and_d_held_constant(step):
    """Central differences of the float64 formula with r and d fixed at the batch's values."""
    x = inputs()
    weights = np.random.default_rng(2).normal(size=x.shape)
    layer = layer_at(step)
    r_max, d_max = (float(v) for v in layer.limits(step))
    gamma, beta = layer.gamma.numpy().astype(np.float64), layer.beta.numpy().astype(np.float64)
    _, r, d = reference(x, gamma, beta, r_max, d_max)

    def loss(x_, gamma_=gamma, beta_=beta):
        return (reference(x_, gamma_, beta_, r_max, d_max, r, d)[0] * weights).sum()

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = tf.reduce_sum(layer(xt, training=True) * tf.constant(weights, tf.float32))
    dx, dgamma, dbeta = tape.gradient(out, [xt, layer.gamma, layer.beta])
    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dgamma, central_difference(lambda g: loss(x, g), gamma), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, central_difference(lambda b: loss(x, gamma, b), beta), rtol=1e-4, atol=1e-4)


def test_inference_is_batch_norms_with_the_moving_statistics():
    x, layer = inputs(), layer_at(3_000)
    expected = (x - MOVING_MEAN) / np.sqrt(MOVING_VARIANCE + EPS) * layer.gamma.numpy() + layer.beta.numpy()
    np.testing.assert_allclose(layer(x, training=False), expected, rtol=1e-5, atol=1e-5)
    assert layer.step.numpy() == 3_000  # inference does not count


def test_saved_as_a_plain_batch_norm_with_the_moving_statistics(tmp_path):
    x, layer = inputs(), layer_at(3_000)
    saved = layer.saved_as()
    assert type(saved) is keras.layers.BatchNormalization
    for mine, theirs in zip([layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance], saved.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    np.testing.assert_array_equal(saved(x, training=False), layer(x, training=False))


def test_the_step_counter_is_in_the_checkpoint_weights(tmp_path, test_batch):
    model = build_model("batch-renorm")
    for _ in range(3):
        model(test_batch, training=True)
    assert [int(layer.step.numpy()) for layer in norm_layers(model)] == [3] * 6
    model.save_weights(tmp_path / "checkpoint.weights.h5")  # as training checkpoints each epoch
    again = build_model("batch-renorm")
    again.load_weights(tmp_path / "checkpoint.weights.h5")
    assert [int(layer.step.numpy()) for layer in norm_layers(again)] == [3] * 6


@pytest.mark.slow
def test_a_resumed_run_continues_the_schedule_where_it_stopped(dataset, tmp_path):
    """Interrupted in epoch 2 of 3 (8 steps an epoch), the run resumes from epoch 1's checkpoint:
    every layer's counter is 8 when training starts again and 24 at the end."""
    steps = {}

    class Counters(keras.callbacks.Callback):
        def __init__(self, stop=False):
            super().__init__()
            self.stop = stop

        def counts(self):
            return {int(layer.step.numpy()) for layer in self.model.layers if hasattr(layer, "step")}

        def on_train_begin(self, logs=None):
            steps.setdefault("begin", []).append(self.counts())

        def on_train_batch_end(self, batch, logs=None):
            if self.stop and self.model.optimizer.iterations.numpy() > 8 + 3:
                raise KeyboardInterrupt

        def on_train_end(self, logs=None):
            steps["end"] = self.counts()

    config = TrainConfig(norm="batch-renorm", epochs=3, train_size=512, test_size=200, batch_size=64)
    with pytest.raises(Interrupted):
        train(config, tmp_path, dataset=dataset, callbacks=[Counters(stop=True)])
    result = train(config, tmp_path, dataset=dataset, callbacks=[Counters()])
    assert result.metrics["status"] == "finished"
    assert steps["begin"] == [{0}, {8}] and steps["end"] == {24}


def test_a_model_file_holds_batch_norm_and_predicts_as_trained(tmp_path, test_batch):
    model = build_model("batch-renorm")
    for layer in norm_layers(model):
        layer.step.assign(3_000)  # r and d at work
    for _ in range(3):
        model(test_batch, training=True)
    save_model(model, tmp_path / "model.keras")
    plain = keras.saving.load_model(tmp_path / "model.keras")
    assert [type(layer).__name__ for layer in plain.layers if layer.name.endswith("_norm")] == ["BatchNormalization"] * 6
    np.testing.assert_allclose(plain.predict(test_batch, verbose=0), model.predict(test_batch, verbose=0),
                               rtol=0, atol=1e-5)
