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
