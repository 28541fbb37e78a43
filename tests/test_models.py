import keras
import numpy as np
import pytest

from normtf.config import TrainConfig
from normtf.errors import UsageError
from normtf.explain import explain, find_statistics_sets
from normtf.models import build_model, norm_layers, trainable_params
from normtf.norms import EPS, NORMS

EXPECTED_PARAMS = {"batch-l1": 9910, "batch": 9910, "group": 9910, "layer": 66974, "layer-c": 9910,
                   "none": 9726, "instance": 9910, "batch-renorm": 9910, "group-ws": 9910}


@pytest.mark.parametrize("norm", NORMS)
def test_trainable_parameters_match_the_reference(norm):
    assert trainable_params(build_model(norm)) == EXPECTED_PARAMS[norm]


def test_model_outputs_log_probabilities_in_float32(test_batch):
    out = keras.ops.convert_to_numpy(build_model("group")(test_batch))
    assert out.shape == (32, 10) and out.dtype == np.float32
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1, rtol=1e-5)


def test_l1_penalty_only_for_batch_l1():
    model = build_model("batch-l1")
    kernels = [w for w in model.trainable_weights if "kernel" in w.path]
    assert len(model.losses) == len(kernels) == 8  # 7 convolutions and the head
    expected = 5e-4 * sum(np.abs(keras.ops.convert_to_numpy(w)).sum() for w in kernels)
    np.testing.assert_allclose(float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses)), expected, rtol=1e-5)
    for norm in ("batch", "layer", "group"):
        assert build_model(norm).losses == []
    assert build_model("batch-l1", TrainConfig(l1=0)).losses == []


def test_group_count_must_divide_every_block():
    for groups in (3, 4, 7, 14):  # each divides some block's channels (14, 28, 12), not all
        with pytest.raises(UsageError, match=r"--groups must be a count that divides every block's channel count "
                                             r"\(1 or 2\)"):
            TrainConfig(norm="group", groups=groups).validate()
    assert trainable_params(build_model("group", TrainConfig(norm="group", groups=1))) == 9910


def _layer_io(norm, config=None, x=None):
    """A norm layer of the model built for `norm`, with random non-trivial gamma/beta, and its I/O."""
    layer = norm_layers(build_model(norm, config))[0]
    rng = np.random.default_rng(0)
    for weight in layer.trainable_weights:
        weight.assign(rng.normal(1.0, 0.5, weight.shape).astype("float32"))
    x = x if x is not None else rng.normal(2.0, 3.0, (8, 26, 26, 14)).astype("float32")
    return layer, x, keras.ops.convert_to_numpy(layer(x, training=True))


def test_batch_norm_equals_per_channel_statistics_over_n_h_w():
    layer, x, y = _layer_io("batch")
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    gamma, beta = (keras.ops.convert_to_numpy(w) for w in (layer.gamma, layer.beta))
    np.testing.assert_allclose(y, gamma * (x - mean) / np.sqrt(var + EPS) + beta, rtol=1e-4, atol=1e-4)


def test_layer_norm_equals_per_sample_statistics_over_h_w_c():
    layer, x, y = _layer_io("layer")
    mean, var = x.mean(axis=(1, 2, 3), keepdims=True), x.var(axis=(1, 2, 3), keepdims=True)
    gamma, beta = (keras.ops.convert_to_numpy(w) for w in (layer.gamma, layer.beta))
    assert gamma.shape == (26, 26, 14)  # element-wise, like PyTorch LayerNorm([C, H, W])
    np.testing.assert_allclose(y, gamma * (x - mean) / np.sqrt(var + EPS) + beta, rtol=1e-4, atol=1e-4)


def test_group_norm_equals_per_sample_and_group_statistics():
    layer, x, y = _layer_io("group")
    groups = x.reshape(8, 26, 26, 2, 7)
    mean, var = groups.mean(axis=(1, 2, 4), keepdims=True), groups.var(axis=(1, 2, 4), keepdims=True)
    normalized = ((groups - mean) / np.sqrt(var + EPS)).reshape(x.shape)
    gamma, beta = (keras.ops.convert_to_numpy(w) for w in (layer.gamma, layer.beta))
    assert gamma.shape == (14,)
    np.testing.assert_allclose(y, gamma * normalized + beta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm, config, count", [
    ("batch", None, 14), ("layer", None, 8), ("group", None, 16),
    ("group", TrainConfig(norm="group", groups=1), 8),  # one group is layer norm with per-channel gamma
    ("layer-c", None, 8),
])
def test_number_of_distinct_means(norm, config, count):
    layer = norm_layers(build_model(norm, config))[0]
    x = np.random.default_rng(1).normal(2.0, 3.0, (8, 26, 26, 14)).astype("float32")
    assert find_statistics_sets(x, keras.ops.convert_to_numpy(layer(x, training=True)))[1] == count


def test_explain_reports_statistics_parameters_and_test_time_behaviour(test_batch):
    n = len(test_batch)
    batch, layer, group = (explain(norm, test_batch) for norm in ("batch-l1", "layer", "group"))
    assert [r.statistics for r in batch] == [r.input_shape[-1] for r in batch] == [14, 28, 14, 12, 12, 12]
    assert [r.statistics for r in layer] == [n] * 6
    assert [r.statistics for r in group] == [2 * n] * 6
    assert all(r.test_time_differs for r in batch) and not any(r.test_time_differs for r in layer + group)
    assert sum(r.trainable for r in layer) == 66974 - 9726 and sum(r.trainable for r in batch) == 184
    assert [r.non_trainable for r in batch] == [2 * r.input_shape[-1] for r in batch]
    assert all(r.non_trainable == 0 for r in layer + group)
