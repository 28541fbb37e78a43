"""The configuration `--jit auto --precision auto` picks on a GPU, rehearsed on this CPU: XLA,
mixed_float16, several training steps per call into TensorFlow and the prefetching pipeline,
asked for explicitly (`--jit on --precision mixed_float16 --steps-per-execution N`). No GPU runs
these tests; they show that every layer of ours compiles and trains that way."""

import json
import os
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from normtf.config import TrainConfig
from normtf.errors import NormtfError
from normtf.norms import NORMS
from normtf.runs import RunDir
from normtf.training import train

STEPS = 4  # per call into TensorFlow; an epoch of 512 images at batch 64 is 8 steps: 2 calls
GPU = dict(jit="on", precision="mixed_float16", steps_per_execution=STEPS, batch_size=64, train_size=512,
           test_size=256)
GPU_FLAGS = ["--jit", "on", "--precision", "mixed_float16", "--steps-per-execution", str(STEPS),
             "--batch-size", "64", "--train-size", "512", "--test-size", "256"]


@pytest.fixture(autouse=True)
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


class Steps(keras.callbacks.Callback):
    """The step indices the progress bar and the non-finite-loss check are shown."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((batch, float(logs["loss"])))


# group: through the command line, below (test_the_documented_command_trains_and_after_sigkill_resumes_...).
# Each variant an XLA compilation: the slow tier.
@pytest.mark.slow
@pytest.mark.parametrize("norm", [norm for norm in NORMS if norm != "group"])
def test_every_variant_trains_and_evaluates_in_the_gpu_configuration(norm, tmp_path, dataset):
    steps = Steps()
    result = train(TrainConfig(norm=norm, epochs=2, **GPU), tmp_path, dataset=dataset, callbacks=[steps])
    assert result.metrics["status"] == "finished", result.metrics
    environment = json.loads(result.run.config.read_text())
    assert environment["environment"]["jit_compile"] is True
    assert environment["environment"]["precision"] == "mixed_float16"
    assert environment["steps_per_execution"] == STEPS
    history = result.run.read_history()
    assert [r["epoch"] for r in history] == [1, 2]
    # Two calls an epoch, each reporting its last step (0-based 3 and 7), with a finite loss.
    assert [batch for batch, _ in steps.seen] == [3, 7, 3, 7]
    assert all(np.isfinite(loss) for _, loss in steps.seen)
    if norm in ("none", "instance"):  # none starts slowly; instance cannot learn here (tests/test_quartet.py)
        return
    assert history[1]["train_accuracy"] > 0.2 and history[1]["train_loss"] < history[0]["train_loss"]  # chance: 0.1
    if not norm.startswith("batch"):
        # Batch norm evaluates with moving statistics that 16 steps have not settled: its test accuracy after
        # 1,024 images was 0.12-0.21 over seeds 42 and 1 with either dropout layer (train accuracy 0.32-0.34, seed 42).
        assert result.metrics["final_test_accuracy"] > 0.2
    assert np.isfinite(result.metrics["final_test_loss"])


@pytest.mark.slow
def test_the_non_finite_loss_check_sees_a_divergence_at_a_call_boundary(tmp_path, dataset):
    result = train(TrainConfig(norm="batch", epochs=1, lr=1e12, **GPU), tmp_path, dataset=dataset)
    assert result.metrics["status"] == "failed"
    assert result.metrics["failure"]["step"] % STEPS == 0  # "by step 4": within the first call


def test_the_non_finite_loss_check_sees_a_divergence_at_a_call_boundary_without_xla(tmp_path, dataset):
    """The test above's contract without its XLA compilation: several steps a call in float32."""
    result = train(TrainConfig(norm="batch", epochs=1, lr=1e12, **{**GPU, "jit": "off", "precision": "float32"}),
                   tmp_path, dataset=dataset)
    assert result.metrics["status"] == "failed"
    assert result.metrics["failure"]["step"] % STEPS == 0  # "by step 4": within the first call


def test_an_op_xla_cannot_compile_is_one_line_naming_it(tmp_path, dataset, monkeypatch):
    import tensorflow as tf

    from normtf import training

    def model_with_an_op_xla_lacks(norm, config):
        inputs = keras.Input((28, 28, 1))
        x = keras.layers.Flatten(name="block1_flatten")(inputs)
        norm_of_rows = keras.layers.Lambda(lambda t: t / tf.math.reduce_euclidean_norm(t, axis=1, keepdims=True),
                                           name="block1_norm")(x)
        outputs = keras.layers.Dense(10, activation="log_softmax", dtype="float32")(norm_of_rows)
        return keras.Model(inputs, outputs)

    monkeypatch.setattr(training, "build_model", model_with_an_op_xla_lacks)
    with pytest.raises(NormtfError) as error:
        train(TrainConfig(norm="group", epochs=1, **{**GPU, "precision": "float32"}), tmp_path, dataset=dataset)
    message = str(error.value)
    assert "EuclideanNorm" in message and "--jit off" in message and "\n" not in message


@pytest.mark.slow
def test_the_documented_command_trains_and_after_sigkill_resumes_with_every_epoch_once(tmp_path):
    """docs/how-it-works.md's GPU command, as typed (plus --runs-dir), in its own process: the flags
    above on 2,048 images (32 steps an epoch: time to kill it in epoch 2), killed with SIGKILL after
    epoch 1, then run again: it resumes, and the run records what it asked for."""
    docs = (Path(__file__).parent.parent / "docs" / "how-it-works.md").read_text()
    typed = docs.split("## On a GPU")[1].split("```bash")[1].split("```")[0].replace("\\\n", " ").split()
    assert typed[:4] == ["normtf", "train", "--norm", "group"]
    flags = typed[4:]
    assert dict(zip(flags[::2], flags[1::2])) == {**dict(zip(GPU_FLAGS[::2], GPU_FLAGS[1::2])), "--epochs": "2",
                                                  "--train-size": "2048"}
    command = [*typed, "--runs-dir", str(tmp_path)]
    run = RunDir(tmp_path / "group")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run.history.exists() and len(json.loads(run.history.read_text())) >= 1):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, "no epoch within 240 s"
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)
    assert not run.metrics.exists(), "the run finished before it could be killed"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "COLUMNS": "200"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert [r["epoch"] for r in run.read_history()] == [1, 2]
    stored = json.loads(run.config.read_text())
    assert stored["environment"]["jit_compile"] is True and stored["environment"]["precision"] == "mixed_float16"
    assert stored["steps_per_execution"] == STEPS
    metrics = run.read_metrics()
    assert metrics["status"] == "finished" and metrics["final_test_accuracy"] > 0.2  # chance is 0.1


def test_a_gpu_runs_the_largest_divisor_of_an_epochs_steps_up_to_32_per_call():
    """The docs' example: the reference recipe's 469 steps an epoch (7 x 67) go 7 at a time on a GPU, one at a time on CPU."""
    from normtf.training import Device, execution_steps

    gpu, cpu = Device("GPU:0", "mixed_float16", True), Device("CPU:0", "float32", False)
    assert execution_steps(469, gpu) == 7 and execution_steps(469, cpu) == 1
    assert execution_steps(468, gpu) == 26 and execution_steps(8, gpu, requested=4) == 4
