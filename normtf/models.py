"""The reference CNN of the study (docs/study.md), with its normalization chosen by name.

The blocks' shapes are config.BLOCKS, which the check of --groups reads without this module. Keras
is imported inside the functions, so that importing this module does not start TensorFlow.
"""

from __future__ import annotations

import math

from normtf.config import BLOCKS, TrainConfig
from normtf.norms import get_norm

TRANSITION_FILTERS = 12
NUM_CLASSES = 10


def build_model(norm: str, config: TrainConfig | None = None):
    """Conv(no bias) -> ReLU -> Norm -> Dropout blocks, channels-last; outputs log-probabilities.
    The variant chooses the norm layer (none for `none`) and the blocks' convolution (norms.NORMS).

    The output is log-softmax in float32 (like the reference's log_softmax + NLL), so the loss is
    sparse cross-entropy with from_logits=True and mixed precision never underflows it.
    """
    import keras
    from keras import layers

    from normtf.dropout import Dropout
    from normtf.fused_blocks import Sequential

    config = config or TrainConfig(norm=norm)
    spec = get_norm(norm)
    regularizer = keras.regularizers.L1(config.l1) if spec.l1 and config.l1 > 0 else None

    def conv(filters, kernel, padding, name, make=layers.Conv2D):
        return make(filters, kernel, padding=padding, use_bias=False, kernel_regularizer=regularizer, name=name)

    model_layers = [keras.Input((28, 28, 1), name="image")]
    for i, (filters, kernel, padding) in enumerate(BLOCKS, start=1):
        model_layers += [conv(filters, kernel, padding, f"block{i}_conv", spec.conv or layers.Conv2D),
                         layers.ReLU(name=f"block{i}_relu")]
        if spec.make:  # the `none` variant's blocks have no norm layer
            norm_layer = spec.make(config)
            norm_layer.name = f"block{i}_norm"
            model_layers.append(norm_layer)
        model_layers.append(Dropout(config.dropout, name=f"block{i}_dropout"))  # keras.layers.Dropout with a cheaper mask
        if i == 2:
            model_layers += [conv(TRANSITION_FILTERS, 1, "valid", "transition_conv"),
                             layers.MaxPooling2D(2, name="pool")]
    model_layers += [
        layers.GlobalAveragePooling2D(name="gap"),
        # The reference's 1x1 conv on the pooled 1x1 map is exactly this bias-free Dense.
        layers.Dense(NUM_CLASSES, use_bias=False, kernel_regularizer=regularizer, name="head"),
        layers.Activation("log_softmax", dtype="float32", name="log_probs"),
    ]
    return Sequential(model_layers, name=f"normtf_{norm.replace('-', '_')}")  # keras.Sequential, fused in training


def trainable_params(model) -> int:
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def norm_layers(model) -> list:
    return [layer for layer in model.layers if layer.name.endswith("_norm")]
