"""Model files any Keras 3 loads: what normtf saves names Keras's own layer classes, loads in a
Python that never imports normtf (safe mode) and predicts there what it predicts in normtf; older
files that name normtf's layers still load in normtf and convert."""

import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from normtf import data
from normtf import model_files as ours
from normtf.config import TrainConfig
from normtf.evaluation import evaluate_file, load_model
from normtf.models import build_model
from normtf.norms import NORMS
from normtf.training import train

# Loads every file it is given with nothing but Keras, then proves normtf was never imported.
LOAD_WITHOUT_NORMTF = """
import sys
import keras
import numpy as np
images = np.load(sys.argv[1])
for path in sys.argv[2:]:
    model = keras.saving.load_model(path)  # safe_mode=True, Keras's default
    np.save(path + ".predictions.npy", model.predict(images, verbose=0))
    print(path, sorted({type(layer).__module__.split(".")[0] for layer in model.layers}))
assert "normtf" not in sys.modules and not any(name.startswith("normtf.") for name in sys.modules)
"""


def _class_entries(path):
    """(module, class_name, registered_name) of the model and every layer a .keras file names."""
    with zipfile.ZipFile(path) as archive:
        model = json.loads(archive.read("config.json"))
    return [(entry["module"], entry["class_name"], entry["registered_name"]) for entry in [model, *model["config"]["layers"]]]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """{variant: model.keras} written by `train`, as `normtf train` writes it: 4 steps each."""
    runs = tmp_path_factory.mktemp("runs")
    paths = {}
    for norm in NORMS:
        config = TrainConfig(norm=norm, epochs=1, train_size=256, test_size=100, batch_size=64, lr=0.05)
        result = train(config, runs, dataset=dataset)
        assert result.metrics["status"] == "finished"
        paths[norm] = result.run.model
    return paths


@pytest.mark.slow
def test_every_variant_loads_without_normtf_and_predicts_what_normtf_does(trained, dataset, tmp_path):
    images = data.normalized(dataset.x_test[:200], dataset.mean, dataset.std)
    np.save(tmp_path / "images.npy", images)
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_NORMTF, tmp_path / "images.npy", *trained.values()],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("['keras']") == len(trained), out.stdout  # every layer one of Keras's own
    for norm, path in trained.items():
        theirs = np.load(f"{path}.predictions.npy")
        mine = load_model(path).predict(images, verbose=0)
        np.testing.assert_allclose(theirs, mine, rtol=0, atol=1e-4, err_msg=norm)
        assert (theirs.argmax(axis=1) == mine.argmax(axis=1)).all(), norm


@pytest.mark.slow
def test_saved_files_name_keras_classes_and_normtf_loads_its_own(trained):
    for norm, path in trained.items():
        entries = _class_entries(path)
        assert not [e for e in entries if "normtf" in json.dumps(e)], norm
        made = NORMS[norm].make(TrainConfig(norm=norm)) if NORMS[norm].make else None  # `none`: no norm layer
        # a layer of normtf.renorm is saved as the batch norm its inference is
        norm_class = type(made).__name__ if type(made).__name__ in ours.OURS else "BatchNormalization" if made else None
        assert {("keras.layers", name, None) for name in (norm_class, "Dropout", "Conv2D") if name} <= set(entries)
        assert ("keras", "Sequential", None) in entries  # not normtf's Sequential, which fuses blocks in training
        loaded = load_model(path)  # normtf evaluates with its own (faster) layers again
        assert {type(layer) for layer in loaded.layers} & set(ours.OURS.values()) == {
            ours.OURS[name] for name in (norm_class, "Dropout") if name}


def test_an_older_file_naming_normtf_layers_still_evaluates_and_converts(dataset, tmp_path):
    """A file as normtf wrote it before (model.save of our layers): `evaluate` and `gallery` read
    it; with_keras_classes converts it with the weights file untouched."""
    model = build_model("group")
    model(data.normalized(dataset.x_test[:64], dataset.mean, dataset.std), training=True)
    path = tmp_path / "old.keras"
    model.save(path)
    assert ("normtf.fused_norms", "GroupNormalization", "normtf>GroupNormalization") in _class_entries(path)
    evaluation = evaluate_file(path, dataset, test_size=500)
    idx = data.stratified_subset(dataset.y_test, 500)
    images = data.normalized(dataset.x_test[idx], dataset.mean, dataset.std)
    expected = model.predict(images, verbose=0).argmax(axis=1)
    assert (evaluation.predictions == expected).all()

    with zipfile.ZipFile(path) as archive:
        weights = archive.read("model.weights.h5")
    assert ours.with_keras_classes(path) and not ours.with_keras_classes(path)  # converts once
    with zipfile.ZipFile(path) as archive:
        assert archive.read("model.weights.h5") == weights
    assert not [e for e in _class_entries(path) if "normtf" in json.dumps(e)]
    plain = keras.saving.load_model(path)
    assert not {type(layer) for layer in plain.layers} & set(ours.OURS.values())
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert evaluate_file(path, dataset, test_size=500).correct == evaluation.correct


@pytest.mark.slow
def test_loading_back_as_normtf_layers_predicts_bit_for_bit(trained, dataset):
    """Saving names Keras's classes; loading in normtf swaps ours back: the same model as trained,
    so `normtf evaluate` reproduces training's counts exactly."""
    images = data.normalized(dataset.x_test[:100], dataset.mean, dataset.std)
    for norm, path in trained.items():
        if any(hasattr(layer, "saved_as") for layer in build_model(norm).layers):
            continue  # saved as other layers than it trains with: tests/test_renorm.py, tests/test_wsconv.py
        plain = keras.saving.load_model(path, compile=False)
        mine = ours.with_our_classes(plain)
        assert type(plain) is keras.Sequential and type(mine) is ours.Sequential  # fused as in training
        assert [layer.name for layer in mine.layers] == [layer.name for layer in plain.layers]
        assert [type(layer).__name__ for layer in mine.layers] == [type(layer).__name__ for layer in plain.layers]
        for a, b in zip(plain.get_weights(), mine.get_weights()):
            np.testing.assert_array_equal(a, b)
        reference = build_model(norm)  # the model as training builds it, with the file's weights
        reference.set_weights(plain.get_weights())
        np.testing.assert_array_equal(mine.predict(images, verbose=0), reference.predict(images, verbose=0))


# One variant of each norm class in the fast tier; batch-l1 and layer-c (the same classes) in the slow one.
@pytest.mark.parametrize("norm", [pytest.param(norm, marks=pytest.mark.slow) if norm in ("batch-l1", "layer-c") else norm
                                  for norm in NORMS])
def test_with_keras_layers_is_the_model_in_keras_classes(norm, dataset):
    """What `normtf bench --against keras-layers` times: every layer of normtf's replaced by the
    Keras layer it subclasses, with the same config and weights, so the same predictions (to
    float32 rounding: the two sum in different orders)."""
    model = build_model(norm)
    plain = ours.with_keras_layers(model)
    assert type(model) is ours.Sequential and type(plain) is keras.Sequential
    assert [type(layer) for layer in plain.layers] == [
        getattr(keras.layers, type(layer).__name__) if type(layer) in ours.OURS.values() else type(layer)
        for layer in model.layers]
    assert not {type(layer) for layer in plain.layers} & set(ours.OURS.values())
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    images = data.normalized(dataset.x_test[:100], dataset.mean, dataset.std)
    np.testing.assert_allclose(plain.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-4)
