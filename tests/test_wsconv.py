"""Weight standardization (normtf.wsconv) against a float64 NumPy computation of Qiao et al.'s
formula as their reference code computes it: outputs, gradients through the standardization, and
the plain Conv2D holding the standardized kernel that a file holds, in float32 and under
mixed_float16 (the GPU's precision)."""

import keras
import numpy as np
import tensorflow as tf

from normtf import wsconv
from normtf.model_files import save_model
from normtf.models import build_model
from numeric import central_difference

rng = np.random.default_rng(3)
X = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
KERNEL = (rng.normal(size=(3, 3, 3, 4)) * 0.2 + 0.05).astype(np.float32)


def standardized(w):
    """Each output channel's weights minus their mean, over their std (n - 1) plus 1e-5."""
    w = w.astype(np.float64)
    centered = w - w.mean(axis=(0, 1, 2))
    return centered / (centered.reshape(-1, w.shape[-1]).std(axis=0, ddof=1) + 1e-5)


def convolve(x, w):
    """Valid cross-correlation (Keras's Conv2D), float64."""
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), w.shape[:2], axis=(1, 2))
    return np.einsum("nijcab,abco->nijo", windows, w)


def layer():
    conv = wsconv.WSConv2D(4, 3, use_bias=False)
    conv.build(X.shape)
    conv.kernel.assign(KERNEL)
    return conv


def test_output_is_the_convolution_with_the_standardized_kernel():
    np.testing.assert_allclose(layer()(X), convolve(X, standardized(KERNEL)), rtol=1e-5, atol=1e-5)
    w = standardized(KERNEL).reshape(-1, 4)
    np.testing.assert_allclose(w.mean(axis=0), 0, atol=1e-12)  # the check can fail: KERNEL's are not
    assert np.abs(KERNEL.reshape(-1, 4).mean(axis=0)).min() > 1e-3


def test_gradients_flow_through_the_standardization():
    weights = rng.normal(size=(2, 3, 3, 4))
    conv = layer()

    xt = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(conv(xt) * tf.constant(weights, tf.float32))
    dx, dkernel = tape.gradient(loss, [xt, conv.kernel])
    np.testing.assert_allclose(dkernel, central_difference(lambda w: (convolve(X, standardized(w)) * weights).sum(), KERNEL),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dx, central_difference(lambda x: (convolve(x, standardized(KERNEL)) * weights).sum(), X),
                               rtol=1e-3, atol=1e-4)


def test_saved_as_a_plain_conv2d_holding_the_standardized_kernel():
    conv = layer()
    saved = conv.saved_as()
    assert type(saved) is keras.layers.Conv2D and saved.get_config() == keras.layers.Conv2D.get_config(conv)
    np.testing.assert_allclose(saved.kernel.numpy(), standardized(KERNEL), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved(X), conv(X), rtol=1e-5, atol=1e-5)


def test_a_model_file_holds_conv2d_and_predicts_as_trained(tmp_path, test_batch):
    model = build_model("group-ws")
    save_model(model, tmp_path / "model.keras")
    plain = keras.saving.load_model(tmp_path / "model.keras")
    convs = [layer for layer in plain.layers if layer.name.startswith("block") and layer.name.endswith("_conv")]
    assert [type(layer) for layer in convs] == [keras.layers.Conv2D] * 6
    trained = [layer for layer in model.layers if isinstance(layer, wsconv.WSConv2D)]
    assert [layer.name for layer in trained] == [layer.name for layer in convs]  # the transition conv stays plain
    for mine, theirs in zip(trained, convs):
        np.testing.assert_allclose(theirs.kernel.numpy(), standardized(mine.kernel.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.predict(test_batch, verbose=0), model.predict(test_batch, verbose=0),
                               rtol=0, atol=1e-5)


def test_under_mixed_float16_the_file_holds_the_kernel_training_convolves_with(tmp_path, test_batch, monkeypatch):
    """Keras hands a layer its variables cast to float16 under mixed_float16, and casts a loaded
    file's float32 Conv2D kernel to float16 when it runs it. The kernel the model convolves with in
    training, standardized from the float32 one and then cast, is the file's kernel so cast, to the
    bit (standardizing the float16-cast kernel made a third of them differ); and the file predicts
    what the model predicts, in that precision."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("group-ws")
        save_model(model, tmp_path / "model.keras")
        plain = keras.saving.load_model(tmp_path / "model.keras")

        convolved = {}  # layer name -> the kernel its convolution got
        convolve_with = keras.layers.Conv2D.convolution_op

        def recording(conv, inputs, kernel):
            convolved[conv.name] = keras.ops.convert_to_numpy(kernel)
            return convolve_with(conv, inputs, kernel)

        with monkeypatch.context() as patch:
            patch.setattr(keras.layers.Conv2D, "convolution_op", recording)
            model(test_batch[:2], training=True)
        trained, saved = (keras.ops.convert_to_numpy(m(test_batch, training=False)) for m in (model, plain))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    convs = {layer.name: layer for layer in plain.layers}
    names = [layer.name for layer in model.layers if isinstance(layer, wsconv.WSConv2D)]
    assert len(names) == 6 and all(convs[name].compute_dtype == "float16" for name in names)
    for name in names:
        assert convolved[name].dtype == np.float16
        np.testing.assert_array_equal(convolved[name], convs[name].kernel.numpy().astype(np.float16))
    np.testing.assert_allclose(saved, trained, rtol=0, atol=1e-2)  # log-probabilities, from float16 activations
    assert (saved.argmax(axis=1) == trained.argmax(axis=1)).all()
