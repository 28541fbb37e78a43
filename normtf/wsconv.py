"""Weight standardization (Qiao et al., 2019), the convolution of the `group-ws` variant.

Each output channel's kernel is standardized over its (kh, kw, in) weights before the convolution:

    w_hat = (w - mean(w)) / (std(w) + eps)

as the paper's reference code computes it (github.com/joe-siyuan-qiao/WeightStandardization):
std is PyTorch's default, with n - 1, and eps = 1e-5 is added to it, not to the variance. The
gradient flows through the standardization to the raw kernel, which is what the optimizer updates.

w_hat is a function of the weights, so a saved model holds a plain keras.layers.Conv2D with w_hat as
its kernel (`saved_as`); the raw kernel is training's business (and the checkpoint's, so that a
resumed run continues from it). Plain Keras, no fused path.

Under mixed precision Keras hands a layer its float32 variables cast to float16; standardizing that
rounded kernel would give another w_hat than the file's, which is standardized from the float32
kernel (a third of the weights differed by a float16 step). So the kernel is read in float32 in
every precision (the variable is made without autocast, Keras's add_weight flag), standardized in
float32 and cast to the compute dtype: the kernel training convolves with is the file's, cast as
Keras casts the file's Conv2D kernel when it runs it.
"""

from __future__ import annotations

import math

import keras
from keras import ops

EPS = 1e-5  # the reference code's, added to the standard deviation


def standardize(kernel):
    """The kernel (kh, kw, in, out) with each output channel's weights at mean 0 and std 1 (n - 1)."""
    w = ops.cast(kernel, "float32")
    n = math.prod(w.shape[:-1])
    centered = w - ops.mean(w, axis=(0, 1, 2), keepdims=True)
    std = ops.sqrt(ops.sum(ops.square(centered), axis=(0, 1, 2), keepdims=True) / (n - 1))
    return centered / (std + EPS)


@keras.saving.register_keras_serializable(package="normtf")
class WSConv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D that convolves with its standardized kernel (channels last)."""

    def add_weight(self, *args, **kwargs):
        """Conv2D's weights; the kernel without autocast: read in float32 in every precision."""
        if kwargs.get("name") == "kernel":
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, ops.cast(standardize(kernel), inputs.dtype))

    def saved_as(self):
        """What a model file holds in this layer's place (normtf.model_files.save_model): Keras's Conv2D
        with this layer's config and the standardized kernel (and bias, if any)."""
        layer = keras.layers.Conv2D.from_config(keras.layers.Conv2D.get_config(self))
        layer.build((None, None, None, self.kernel.shape[2]))
        layer.set_weights([keras.ops.convert_to_numpy(standardize(self.kernel)),
                           *[v.numpy() for v in self.weights[1:]]])
        return layer
