import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import normtf
from normtf import data
from normtf import study
from normtf.config import TrainConfig
from normtf.errors import Interrupted, NormtfError, UsageError
from normtf.evaluation import evaluate_file
from normtf.files import atomic_write
from normtf.models import build_model
from normtf.norms import NORMS
from normtf.runs import RunDir
from normtf.training import compile_model, learning_rate, train

TINY = dict(epochs=1, train_size=1000, test_size=500)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, dataset):
    """batch-l1 and group, 2 epochs on a 10,000-image subset, tested on all 10,000 test images."""
    runs = tmp_path_factory.mktemp("runs")
    results = study.compare(["batch-l1", "group"], TrainConfig(epochs=2, train_size=10000), runs)
    return runs, {r.config.norm: r for r in results}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, dataset):
    """batch-l1, 1 epoch of 512 images, tested on all 10,000 test images: a run to read, not to learn."""
    runs = tmp_path_factory.mktemp("small")
    return runs, train(TrainConfig(norm="batch-l1", epochs=1, train_size=512), runs, dataset=dataset)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch-l1", "group"])
def test_two_epochs_on_10k_images_reach_80_percent(trained, norm):
    result = trained[1][norm]
    assert [r["epoch"] for r in result.history] == [1, 2]
    # Measured on 2 CPU cores: batch-l1 88.49%, group 84.18% (chance is 10%).
    assert result.metrics["final_test_accuracy"] >= 0.80
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


def test_a_run_records_config_history_metrics_and_model(small_run, dataset):
    result = small_run[1]
    run = result.run
    stored = json.loads(run.config.read_text())
    assert stored["config"]["norm"] == "batch-l1" and stored["config"]["train_size"] == 512
    assert {"tensorflow", "keras", "numpy", "python", "device", "precision"} <= set(stored["environment"])
    assert stored["environment"]["precision"] == "float32" and stored["environment"]["jit_compile"] is False
    assert stored["trainable_params"] == 9910
    # Provenance: which normtf, and exactly which data bytes, never a path on this machine.
    assert stored["normtf"]["version"] == normtf.__version__ and len(stored["normtf"]["commit"]) == 40
    assert isinstance(stored["normtf"]["uncommitted_changes"], bool)
    assert stored["data"] == {"dataset": "mnist", "origin": "cache", "sha256": data.DATASETS["mnist"].files,
                              "normalization": {"mean": 0.1307, "std": 0.3081}}
    assert str(Path.home()) not in run.config.read_text() and "/tmp" not in run.config.read_text()
    csv_lines = run.history_csv.read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 2
    metrics = run.read_metrics()
    assert metrics["status"] == "finished" and metrics["trainable_params"] == 9910 and metrics["epochs"] == 1
    assert metrics["best_test_accuracy"] == max(r["test_accuracy"] for r in result.history)
    # The L1 penalty is in the objective, not in the reported cross-entropy.
    record = result.history[-1]
    assert record["train_objective"] > record["train_loss"]
    assert not run.checkpoint_dir.exists()
    evaluation = evaluate_file(run.model, dataset)
    assert evaluation.correct == round(metrics["final_test_accuracy"] * 10000)
    np.testing.assert_allclose(evaluation.loss, metrics["final_test_loss"], rtol=1e-4)


def test_a_finished_run_is_reused_and_not_overwritten_by_other_settings(small_run):
    runs, result = small_run
    again = train(result.config, runs)
    assert again.reused and again.history == result.history
    with pytest.raises(UsageError, match="finished run with other settings .*epochs 1 -> 3"):
        train(result.config.replace(epochs=3), runs)


def test_interrupted_training_resumes_from_the_last_finished_epoch(dataset, tmp_path):
    class StopInEpoch2(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() > 8 + 3:
                raise KeyboardInterrupt

    config = TrainConfig(norm="group", epochs=3, train_size=1000, test_size=500)
    with pytest.raises(Interrupted, match="1 of 3 epochs .* run the same command again to resume"):
        train(config, tmp_path, dataset=dataset, callbacks=[StopInEpoch2()])
    run = RunDir(tmp_path / "group")
    assert run.status(config) == "partial" and len(run.read_history()) == 1 and run.checkpoint(1).exists()
    result = train(config, tmp_path, dataset=dataset)
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.metrics["status"] == "finished"


def test_ctrl_c_that_python_drops_in_a_finalizer_still_stops_training(dataset, tmp_path, monkeypatch):
    """A SIGINT whose KeyboardInterrupt is raised inside a __del__ (Python prints it and goes on,
    as when a tf.data iterator is collected at an epoch's end) still interrupts: at the next batch."""
    import signal

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer

    class DroppedCtrlC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                Finalized()  # collected at once

    dropped = []  # what Python reports as "Exception ignored in ..." and goes on
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist workers ignore it)
    try:
        config = TrainConfig(norm="group", epochs=3, train_size=1000, test_size=500)
        with pytest.raises(Interrupted, match="1 of 3 epochs .* run the same command again to resume"):
            train(config, tmp_path, dataset=dataset, callbacks=[DroppedCtrlC()])
        assert dropped == [KeyboardInterrupt]  # Python did drop the first one
        assert len(RunDir(tmp_path / "group").read_history()) == 1
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_process_started_ignoring_ctrl_c_keeps_ignoring_it_while_training(dataset, tmp_path):
    import signal

    seen = []

    class During(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # `normtf train &` in a script
    try:
        train(TrainConfig(norm="group", **TINY), tmp_path, dataset=dataset, callbacks=[During()])
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen[0][0] is signal.SIG_IGN and callable(seen[0][1])  # SIGTERM still stops it


def test_non_finite_loss_stops_the_run_and_marks_it_failed(dataset, tmp_path):
    result = train(TrainConfig(norm="batch", lr=1e12, **TINY), tmp_path, dataset=dataset)
    failure = result.metrics["failure"]
    assert result.metrics["status"] == "failed" and failure["epoch"] == 1 and failure["step"] >= 1
    assert "loss became" in failure["reason"] and not result.run.model.exists()
    assert result.run.status(result.config) == "failed"
    assert study.draw_curves([result], tmp_path / "curves.png") is None  # never drawn as a curve


def test_a_run_traces_its_training_step_once(dataset, tmp_path, monkeypatch):
    """The optimizer is built before fit: its variables, made inside the first trace, would make
    TensorFlow trace (and under XLA compile) the whole training step a second time."""
    traced = []
    step = keras.Model.train_step
    monkeypatch.setattr(keras.Model, "train_step", lambda self, batch: traced.append(1) or step(self, batch))
    train(TrainConfig(norm="group", **TINY), tmp_path, dataset=dataset)
    assert len(traced) == 1


def test_a_run_directory_is_locked_against_a_second_trainer(dataset, tmp_path):
    with RunDir(tmp_path / "layer").locked():
        with pytest.raises(NormtfError, match=r"another normtf process \(pid \d+\) is training into"):
            train(TrainConfig(norm="layer", **TINY), tmp_path, dataset=dataset)


def test_a_run_locked_by_the_command_that_started_the_trainer_is_trained_under_that_lock(dataset, tmp_path):
    """On Ray the driver holds each run's lock while its job trains it in place: the job, given the
    driver's token, trains the run and leaves the lock to the driver."""
    run = RunDir(tmp_path / "layer")
    with run.locked("driver-token"):
        result = train(TrainConfig(norm="layer", **TINY), tmp_path, dataset=dataset, lock_token="driver-token")
        assert result.metrics["status"] == "finished" and run.held_for("driver-token")
    assert run.status() == "finished" and not run.lock_file.exists()


def test_corrupt_history_is_reported_and_the_run_started_over(dataset, tmp_path):
    config = TrainConfig(norm="layer", epochs=1, train_size=1000, test_size=500)
    run = RunDir(tmp_path / "layer")
    train(config, tmp_path, dataset=dataset)
    run.metrics.unlink()
    run.history.write_text('[{"epoch": 1, "train_loss": 0.3')  # as if cut off mid-write
    assert study.load_result(run) is None
    warnings = []
    result = train(config, tmp_path, dataset=dataset, warn=warnings.append)
    assert any("truncated or corrupt" in w for w in warnings)
    assert [r["epoch"] for r in result.history] == [1] and result.metrics["status"] == "finished"


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_sizes_larger_than_the_data_are_refused(dataset, tmp_path):
    with pytest.raises(UsageError, match="--train-size 70000 is more than the 60,000 images"):
        train(TrainConfig(norm="batch", train_size=70000), tmp_path, dataset=dataset)


@pytest.mark.parametrize("norm", [norm if norm == "batch-l1" else pytest.param(norm, marks=pytest.mark.slow)
                                  for norm in NORMS])  # the study's run in the fast tier
def test_mixed_float16_step_runs_without_nans(norm, test_batch, dataset):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_model(build_model(norm), TrainConfig(norm=norm), jit=False)
        assert model.layers[0].compute_dtype == "float16" and model(test_batch[:2]).dtype == "float32"
        logs = model.train_on_batch(test_batch, dataset.y_test[:32].astype("int32"), return_dict=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(logs["loss"])
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.trainable_weights)


@pytest.mark.slow
def test_compare_resumes_an_interrupted_run_and_reuses_finished_ones(dataset, tmp_path):
    class StopInEpoch2(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    config = TrainConfig(epochs=2, train_size=1000, test_size=500)
    train(config.replace(norm="layer-c"), tmp_path, dataset=dataset)
    with pytest.raises(Interrupted):
        train(config.replace(norm="group"), tmp_path, dataset=dataset, callbacks=[StopInEpoch2()])
    results = study.compare(["layer-c", "group"], config, tmp_path)
    assert [r.reused for r in results] == [True, False]
    assert [r["epoch"] for r in results[1].history] == [1, 2]


def test_corrupt_metrics_are_reported_and_the_run_is_not_shown(dataset, tmp_path):
    config = TrainConfig(norm="layer-c", epochs=1, train_size=1000, test_size=500)
    run = train(config, tmp_path, dataset=dataset).run
    run.metrics.write_text('{"status": "fini')
    warnings = []
    assert study.load_result(run, warnings.append) is None and "truncated or corrupt" in warnings[0]
    with pytest.raises(NormtfError, match="no trained MNIST run"):
        study.stored_results(["layer-c"], tmp_path)
    result = train(config, tmp_path, dataset=dataset, warn=warnings.append)
    assert "truncated or corrupt" in warnings[-1] and result.metrics["status"] == "finished" and not result.reused


def test_one_cycle_warms_up_to_the_peak_and_anneals_to_zero():
    config = TrainConfig(schedule="one-cycle", lr=0.05, epochs=10)
    schedule = learning_rate(config, steps_per_epoch=100)
    rates = [float(schedule(step)) for step in (0, 150, 300, 650, 999, 1000)]
    assert rates[0] == pytest.approx(0.005) and rates[1] == pytest.approx(0.0275)  # linear from lr/10
    assert rates[2] == pytest.approx(0.05)  # the peak at 30% of the steps
    assert rates[3] == pytest.approx(0.025, rel=1e-3)  # cosine: half way down half way through the rest
    assert rates[4] < 1e-5 and rates[5] == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(TrainConfig(), 100) == 0.01  # the reference recipe: constant


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_force_keeps_a_finished_run_until_the_new_one_has_an_epoch(dataset, tmp_path):
    config = TrainConfig(norm="batch", **TINY)
    finished = train(config, tmp_path, dataset=dataset).run
    before = _files(finished.path)
    assert ".lock" not in before  # the lock goes with the process that held it

    # A replacement that fails in its first epoch: the finished run stays, byte for byte.
    failed = train(config.replace(lr=1e12), tmp_path, dataset=dataset, force=True)
    assert failed.metrics["status"] == "failed" and _files(finished.path) == before
    assert not finished.replaced_dir.exists()

    # A replacement killed before its first epoch (set aside, no history yet): the next run puts it back.
    finished.set_aside()
    (finished.path / "config.json").write_text(json.dumps({"config": config.replace(lr=0.02).to_dict()}))
    again = train(config, tmp_path, dataset=dataset)
    assert again.reused and _files(finished.path) == before

    # A replacement that finishes its first epoch replaces it.
    replaced = train(config.replace(lr=0.02), tmp_path, dataset=dataset, force=True)
    assert replaced.metrics["status"] == "finished" and _files(finished.path) != before
    assert not finished.replaced_dir.exists()


@pytest.mark.slow
def test_reusing_finished_runs_leaves_no_lock_files(dataset, tmp_path):
    config = TrainConfig(norm="group", **TINY)
    study.compare(["group"], config, tmp_path, seeds=[1, 2])
    study.compare(["group"], config, tmp_path, seeds=[1, 2])  # reused
    assert not list(tmp_path.rglob(".lock"))
