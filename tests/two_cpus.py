"""Scenarios run in a subprocess whose CPU is split into 2 logical devices (must happen before
TensorFlow starts), printing their findings as JSON. Used by test_distributed.py."""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from normtf.config import TrainConfig  # noqa: E402
from normtf.models import build_model, norm_layers  # noqa: E402
from normtf.training import make_strategy, train  # noqa: E402


def batch_norm_statistics():
    """One training step of the first batch-norm layer on a global batch of 8 split over 2 replicas."""
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 26, 26, 14)).astype("float32")
    single = norm_layers(build_model("batch"))[0]
    expected = keras.ops.convert_to_numpy(single(x, training=True))
    found = {}
    for sync in (True, False):
        strategy = make_strategy("mirrored")
        with strategy.scope():
            layer = norm_layers(build_model("batch", TrainConfig(norm="batch", sync_bn=sync)))[0]
        halves = strategy.experimental_distribute_values_from_function(
            lambda context: x[4 * context.replica_id_in_sync_group:4 * (context.replica_id_in_sync_group + 1)])
        outputs = strategy.experimental_local_results(strategy.run(lambda h: layer(h, training=True), args=(halves,)))
        output = np.concatenate([keras.ops.convert_to_numpy(o) for o in outputs])
        moving_mean = keras.ops.convert_to_numpy(layer.moving_mean)
        found[sync] = {"replicas": strategy.num_replicas_in_sync,
                       "max_output_difference": float(np.abs(output - expected).max()),
                       "max_moving_mean_difference": float(np.abs(moving_mean - keras.ops.convert_to_numpy(single.moving_mean)).max())}
    return {"sync": found[True], "no_sync": found[False]}


def mirrored_training(runs_dir):
    config = TrainConfig(norm="batch", strategy="mirrored", sync_bn=True, epochs=2, train_size=4000, test_size=1000)
    result = train(config, runs_dir)
    stored = json.loads(result.run.config.read_text())
    return {"replicas": stored["environment"]["replicas"], "accuracy": result.metrics["final_test_accuracy"],
            "test_losses": [r["test_loss"] for r in result.history]}


def multi_worker_training(runs_dir):
    """With no TF_CONFIG, a multi-worker strategy is one worker: it must still train."""
    config = TrainConfig(norm="batch", strategy="multi-worker", sync_bn=True, epochs=1, train_size=2000,
                         test_size=500)
    result = train(config, runs_dir)
    return {"strategy": json.loads(result.run.config.read_text())["environment"]["strategy"],
            "status": result.metrics["status"]}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    print(json.dumps({"bn": batch_norm_statistics, "train": mirrored_training,
                      "multi-worker": multi_worker_training}[scenario](*args)))
