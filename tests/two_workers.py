"""One worker of a two-process MultiWorkerMirroredStrategy cluster (TF_CONFIG set by
test_distributed.py), printing its findings as JSON:

- keras_alone: what Keras's own `fit` does with a plain model under two workers (it fails:
  keras-team/keras#20585, tensorflow/tensorflow#72388); with_workaround: the losses of the same
  model trained with normtf's workaround.
- sync_bn: the batch-norm moving statistics of normtf's `batch --sync-bn` model after one training
  step on a global batch of 128 real MNIST images, 64 on each worker.
"""

import json

import keras
import numpy as np

from normtf import data
from normtf.config import TrainConfig
from normtf.models import norm_layers

SYNC_BN = TrainConfig(norm="batch", strategy="multi-worker", sync_bn=True, dropout=0.0, precision="float32", jit="off")


def plain_model(strategy):
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                                  keras.layers.Flatten(), keras.layers.Dense(10)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def first_batch():
    """The first training batch of a 128-image run (seed 42), as normtf's pipeline makes it."""
    dataset = data.load("mnist")
    idx = data.stratified_subset(dataset.y_train, 128)
    return data.train_dataset(dataset.x_train[idx], dataset.y_train[idx], 128, 42, 8.0, 0, 1,
                              dataset.mean, dataset.std)


def moving_statistics(model):
    return {layer.name: [keras.ops.convert_to_numpy(layer.moving_mean).tolist(),
                         keras.ops.convert_to_numpy(layer.moving_variance).tolist()] for layer in norm_layers(model)}


if __name__ == "__main__":
    from normtf.training import make_strategy, prepare

    strategy = make_strategy("multi-worker")  # before any other TensorFlow op

    import tensorflow as tf

    from normtf.distribute import work_around_keras

    x = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((x, np.arange(64) % 10)).batch(16)
    found = {}
    try:
        plain_model(strategy).fit(batches, epochs=1, verbose=0)
        found["keras_alone"] = "trained"
    except ValueError as e:
        found["keras_alone"] = str(e).strip().splitlines()[-1]
    found["with_workaround"] = work_around_keras(plain_model(strategy)).fit(batches, epochs=2, verbose=0).history["loss"]

    model, _, _ = prepare(SYNC_BN)  # normtf's workaround included
    model.fit(first_batch(), epochs=1, steps_per_epoch=1, verbose=0)
    found["sync_bn"] = moving_statistics(model)
    print(json.dumps(found))
