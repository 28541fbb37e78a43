"""`normtf evaluate` on what it cannot measure as it is: one clear line, or a said adjustment."""

import json

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from normtf import data
from normtf.cli import app
from normtf.config import TrainConfig
from normtf.evaluation import as_log_probabilities, evaluate
from normtf.models import build_model
from normtf.training import train


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _one_line_error(result, code=1):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code and len(" ".join(lines)) > 0, result.output
    return " ".join(" ".join(lines).split())  # the console may wrap the one line


def _plain_model(shape, activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(shape), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(10, activation=activation)])


def test_a_model_for_other_images_is_refused_in_one_line(tmp_path):
    _plain_model((32, 32, 3)).save(tmp_path / "cifar.keras")
    text = _one_line_error(run("evaluate", tmp_path / "cifar.keras", "--test-size", "100"))
    assert "takes inputs of shape 32x32x3" in text and "28x28x1" in text


def test_a_model_with_other_outputs_is_refused_in_one_line(tmp_path):
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(7)]).save(tmp_path / "m.keras")
    text = _one_line_error(run("evaluate", tmp_path / "m.keras", "--test-size", "100"))
    assert "outputs 7 values" in text and "10" in text


@pytest.mark.parametrize("activation,said", [(None, "taken as logits"), ("softmax", "outputs probabilities")])
def test_logits_and_probabilities_are_turned_into_log_probabilities_and_said(activation, said, tmp_path, dataset):
    """The loss is the cross-entropy of what the model predicts, whatever form its output takes."""
    model = _plain_model((28, 28, 1), activation)
    model.save(tmp_path / "plain.keras")
    result = run("evaluate", tmp_path / "plain.keras", "--test-size", "200")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert said in text
    idx = data.stratified_subset(dataset.y_test, 200)
    images = data.normalized(dataset.x_test[idx], dataset.mean, dataset.std)
    outputs = model.predict(images, verbose=0).astype(np.float64)
    probabilities = outputs if activation else np.exp(outputs) / np.exp(outputs).sum(axis=1, keepdims=True)
    loss = -np.log(probabilities[np.arange(200), dataset.y_test[idx]]).mean()
    assert f"test loss {loss:.4f}," in text


def test_log_probabilities_pass_unchanged_and_unremarked(dataset):
    said = []
    model = build_model("group")
    images, labels = dataset.x_test[:300], dataset.y_test[:300]
    result = evaluate(model, images, labels, (dataset.mean, dataset.std), warn=said.append)
    outputs = model.predict(data.normalized(images, dataset.mean, dataset.std), verbose=0).astype(np.float64)
    assert not said and result.loss == pytest.approx(-outputs[np.arange(300), labels].mean(), rel=1e-6)
    np.testing.assert_array_equal(as_log_probabilities(outputs), outputs)


def test_a_failed_run_says_where_it_failed(tmp_path, dataset):
    config = TrainConfig(norm="group", lr=1e12, epochs=1, train_size=1000, test_size=200)
    result = train(config, tmp_path, dataset=dataset)
    failure = result.metrics["failure"]
    text = _one_line_error(run("evaluate", tmp_path / "group"))
    assert f"this run failed at epoch {failure['epoch']} step {failure['step']} (non-finite loss)" in text
    assert "train one first" not in text


def test_a_seeds_parent_directory_lists_its_runs(tmp_path):
    parent = tmp_path / "runs" / "group"
    for seed in (42, 43, 100):
        (parent / f"seed-{seed}").mkdir(parents=True)
    (parent / "seed-42" / "metrics.json").write_text(json.dumps({"status": "finished"}))
    text = _one_line_error(run("evaluate", parent))
    assert "seed-42/, seed-43/, seed-100/" in text and f"normtf evaluate {parent / 'seed-42'}" in text


@pytest.mark.slow
def test_precise_bn_recomputes_batch_norm_statistics_of_a_committed_run(tmp_path):
    """--precise-bn: the run's own training images at its batch size give every batch-norm layer
    new statistics (the accuracy moves); a model without batch norm is unchanged and says so; a
    file outside a run directory has no training recipe to follow."""
    from pathlib import Path

    from normtf.evaluation import evaluate_file, load_model, run_config, use_precise_statistics

    run_dir = Path(__file__).parent.parent / "results" / "reference" / "batch-l1" / "seed-43"
    result = run("evaluate", run_dir, "--precise-bn", "--test-size", "2000")
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "with precise batch-norm statistics, dropout off, as at test time: test loss" in text, text

    images = data.load("mnist")
    model, config = load_model(run_dir), run_config(run_dir)
    before = [keras.ops.convert_to_numpy(layer.moving_variance) for layer in model.layers if "norm" in layer.name]
    assert config.batch_size == 128 and use_precise_statistics(model, config.replace(train_size=5000), images) == 6
    after = [keras.ops.convert_to_numpy(layer.moving_variance) for layer in model.layers if "norm" in layer.name]
    assert all(not np.allclose(a, b, rtol=1e-3) for a, b in zip(before, after))

    said = []
    group = Path(__file__).parent.parent / "results" / "reference" / "group" / "seed-43"
    plain, precise = evaluate_file(group, images, 500), evaluate_file(group, images, 500, said.append, precise_bn=True)
    assert plain.correct == precise.correct and "no batch-norm layer" in said[0]

    (tmp_path / "model.keras").write_bytes((run_dir / "model.keras").read_bytes())
    result = run("evaluate", tmp_path / "model.keras", "--precise-bn")
    assert result.exit_code == 1 and "needs the run's config.json" in " ".join(result.output.split())


@pytest.mark.slow
def test_precise_bn_through_the_command_on_a_small_run(tmp_path):
    """The test above's command on a run of 512 images (its statistics recomputed over those 512, not
    a committed run's 60,000): the numbers three ways printed (moving averages, precise statistics
    with dropout on and off), and a file outside its run directory refused."""
    runs = tmp_path / "runs"
    trained = run("train", "--norm", "batch", "--epochs", "1", "--train-size", "512", "--test-size", "200",
                  "--runs-dir", runs)
    assert trained.exit_code == 0, trained.output
    result = run("evaluate", runs / "batch", "--precise-bn", "--test-size", "200")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    for way in ["with the moving averages of training", "with precise batch-norm statistics, dropout on, as in training",
                "with precise batch-norm statistics, dropout off, as at test time"]:
        assert f"{way}: test loss" in text, (way, text)
    (tmp_path / "model.keras").write_bytes((runs / "batch" / "model.keras").read_bytes())
    result = run("evaluate", tmp_path / "model.keras", "--precise-bn")
    assert result.exit_code == 1 and "needs the run's config.json" in " ".join(result.output.split())
