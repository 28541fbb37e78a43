"""A file an older normtf wrote, before normtf/layers.py was split by job (normtf.dropout,
normtf.fused_norms, normtf.fused_blocks, normtf.model_files): it names the module normtf.layers,
which no longer exists. Keras finds the classes by their registered names (normtf>...), which
normtf.model_files registers, so normtf still evaluates and converts it."""

import json
import zipfile

from normtf import data
from normtf.evaluation import evaluate_file
from normtf.model_files import with_keras_classes
from normtf.models import build_model


def _with_module(path, module):
    """The .keras file at `path` rewritten so that every normtf class it names is in `module`."""
    with zipfile.ZipFile(path) as source:
        entries = {info.filename: source.read(info) for info in source.infolist()}
    config = json.loads(entries["config.json"])
    named = 0
    for layer in [config, *config["config"]["layers"]]:
        if str(layer.get("registered_name")).startswith("normtf>"):
            layer["module"], named = module, named + 1
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as target:
        for name, content in entries.items():
            target.writestr(name, content)
    return named


def test_a_file_naming_the_old_normtf_layers_module_evaluates_and_converts(dataset, tmp_path):
    model = build_model("group")
    images = data.normalized(dataset.x_test[:64], dataset.mean, dataset.std)
    model(images, training=True)
    path = tmp_path / "old.keras"
    model.save(path)
    assert _with_module(path, "normtf.layers") >= 7  # the model, six norm layers, the dropouts
    evaluation = evaluate_file(path, dataset, test_size=500)
    idx = data.stratified_subset(dataset.y_test, 500)
    expected = model.predict(data.normalized(dataset.x_test[idx], dataset.mean, dataset.std), verbose=0).argmax(axis=1)
    assert (evaluation.predictions == expected).all()
    assert with_keras_classes(path)
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert {(entry["module"], entry["registered_name"]) for entry in [config, *config["config"]["layers"]]} <= {
        ("keras", None), ("keras.layers", None)}
