"""normtf's Sequential: the model's training step runs each ReLU -> norm -> Dropout as one function
(the norm layer's fused_call, normtf.fused_norms) and each ReLU inside the convolution before it.
normtf.models builds the CNN as one. Why: fewer passes over the activations in training, and no
ReLU pass at all; outputs and gradients stay the layers' own, one after another
(tests/test_layers.py). Anything else in the model runs as Keras's, layer by layer."""

from __future__ import annotations

import keras

from normtf.dropout import Dropout
from normtf.fused_norms import BatchNormalization, GroupNormalization, LayerNormalization


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
    BiasAdd (relu_into_conv): TensorFlow's graph optimizer (grappler's remapper) fuses Conv2D ->
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
                    x = norm.fused_call(relu_into_conv(x, gradient=False), relu=True, relu_applied=True,
                                        keep=dropout.mask_key())
                else:
                    x = norm.fused_call(x, relu=True, keep=dropout.mask_key())
                i += 3
                continue
            if not training and after_conv and _plain_relu(layers[i]):
                x = relu_into_conv(x)
            else:
                x = layers[i](x) if training is None else layers[i](x, training=training)
            i += 1
        return x


def relu_into_conv(x, gradient: bool = True):
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
            return relu_into_conv(t), lambda upstream: upstream

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
