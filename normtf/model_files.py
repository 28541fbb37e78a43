"""Model files any Keras 3 loads: normtf's layers are a training detail. A model.keras that normtf
writes names Keras's own classes (save_model), so it loads without normtf, safe mode included;
normtf swaps its own layers back in to evaluate a file at their speed (with_our_classes), and
Keras's in to measure against them (with_keras_layers). Importing this module registers normtf's
classes, so that older files that name them (normtf>GroupNormalization...) load too."""

from __future__ import annotations

import json
import os
import zipfile

import keras

from normtf.dropout import Dropout
from normtf.fused_blocks import Sequential
from normtf.fused_norms import BatchNormalization, GroupNormalization, LayerNormalization

# normtf's layers by the name of the Keras class each replaces (same config and weights).
OURS = {cls.__name__: cls for cls in (Dropout, BatchNormalization, GroupNormalization, LayerNormalization)}


def save_model(model, path) -> None:
    """model.save(path), then with_keras_classes(path): every model.keras normtf writes. Renaming
    in the written file, rather than saving a copy of the model built from Keras's classes, keeps
    what Keras wrote (weights, optimizer state) byte for byte, and is the same step that converts
    an older file. A layer that holds more than the Keras layer its inference is (batch
    renormalization's step counter, weight standardization's raw kernel) says which layer to save
    in its place (`saved_as()`); a model with one is saved as such a copy, without optimizer state
    (it belongs to weights the file does not hold)."""
    if any(hasattr(layer, "saved_as") for layer in model.layers):
        model = keras.Sequential([keras.Input(model.input_shape[1:], name=model._layers[0].name),
                                  *[layer.saved_as() if hasattr(layer, "saved_as") else layer for layer in model.layers]],
                                 name=model.name)
    model.save(path)
    with_keras_classes(path)


def with_keras_classes(path) -> bool:
    """Rewrite a .keras file in place so that it names Keras's classes where it names normtf's
    (`normtf>GroupNormalization` -> keras.layers.GroupNormalization, `normtf>Sequential` ->
    keras.Sequential; each of ours is a subclass with the same config and variables). Only
    config.json changes: the weights, the optimizer state and the metadata are copied byte for byte. Also converts a file that an older
    normtf wrote (it names normtf's classes, so needs normtf to load). Returns whether it renamed
    anything."""
    def rename(node) -> int:
        if isinstance(node, list):
            return sum(rename(item) for item in node)
        if not isinstance(node, dict):
            return 0
        count = sum(rename(value) for value in node.values())
        name = node.get("registered_name")
        if isinstance(name, str) and name.startswith("normtf>"):
            name = name[len("normtf>"):]
            # any layer Keras has, not only OURS: a model built by normtf on 2026-11-26 and saved
            # by model.save itself names normtf's Conv2D, a layer since removed
            module = "keras" if name == "Sequential" else "keras.layers" if hasattr(keras.layers, name) else None
            if module:
                node.update(module=module, class_name=name, registered_name=None)
                count += 1
        return count

    with zipfile.ZipFile(path) as source:
        config = json.loads(source.read("config.json"))
        if not rename(config):
            return False
        partial = f"{path}.converting"
        try:
            with zipfile.ZipFile(partial, "w") as target:
                for info in source.infolist():
                    data = json.dumps(config).encode() if info.filename == "config.json" else source.read(info)
                    target.writestr(info, data)
        except BaseException:
            os.unlink(partial)
            raise
    os.replace(partial, path)  # the file is the old one or the converted one, never half of either
    return True


def with_our_classes(model):
    """The model with normtf's layers in place of the Keras layers they replace (the inverse of
    with_keras_classes), same config and weights, as normtf's Sequential: normtf evaluates a loaded
    file at its own layers' speed, and to what it computed when training. Keras's
    GroupNormalization made the 10k-image evaluation of a group-norm model 1.8x as slow. Other
    models than Sequential ones (normtf's are) are returned as they are."""
    return _clone_with(model, {getattr(keras.layers, name): cls for name, cls in OURS.items()}, Sequential)


def with_keras_layers(model, names=None):
    """The model with Keras's own layers in place of normtf's (all, or those of OURS's `names`),
    same config and weights, as a keras.Sequential: what normtf's layers are measured against
    (`normtf bench --against keras-layers`, or keras-Dropout etc. for one class)."""
    return _clone_with(model, {cls: getattr(keras.layers, name) for name, cls in OURS.items()
                               if names is None or name in names}, keras.Sequential)


def _clone_with(model, classes: dict, sequential):
    """A copy of a Sequential model as class `sequential`, whose layers of a class in `classes`
    are made by its value."""
    if not isinstance(model, keras.Sequential) or (
            type(model) is sequential and not any(type(layer) in classes for layer in model.layers)):
        return model
    copy = keras.models.clone_model(
        model, clone_function=lambda layer: classes.get(type(layer), type(layer)).from_config(layer.get_config()))
    if type(copy) is not sequential:
        copy = sequential(copy._layers, name=copy.name)  # _layers: the input layer too
    copy.set_weights(model.get_weights())
    return copy
