"""normtf tune: the validation split (disjoint from the images a run fits, the same whatever the
run's seed, the test set untouched)."""

import json

import numpy as np
import pytest

from normtf import data
from normtf.config import TrainConfig
from normtf.runs import RunDir, history_keys
from normtf.training import train


# --- the validation split ------------------------------------------------------------------------

def test_the_validation_split_is_stratified_disjoint_and_train_size_takes_from_the_rest(dataset):
    labels = dataset.y_train
    train_idx, held = data.validation_split(labels, 10_000)
    assert len(held) == 10_000 and len(train_idx) == 50_000 and not np.intersect1d(train_idx, held).size
    assert np.abs(np.bincount(labels[held]) - np.bincount(labels) * 10_000 / 60_000).max() <= 1  # each class in proportion
    subset, same = data.validation_split(labels, 10_000, train_size=1_000)
    np.testing.assert_array_equal(same, held)  # the split is the split, whatever --train-size
    assert len(subset) == 1_000 and np.isin(subset, train_idx).all()


class Untouchable:
    """Stands for the test set in a run with a validation split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test set was touched ({name})")

    def __getitem__(self, key):
        raise AssertionError("the test set was touched")

    def __len__(self):
        raise AssertionError("the test set was touched")


def test_a_run_with_a_validation_split_is_measured_on_it_and_never_touches_the_test_set(dataset, tmp_path,
                                                                                       monkeypatch):
    validation_runs([42], dataset, tmp_path, monkeypatch)


@pytest.mark.slow  # a second run: 10 s
def test_runs_of_other_seeds_are_measured_on_the_same_images(dataset, tmp_path, monkeypatch):
    validation_runs([42, 43], dataset, tmp_path, monkeypatch)


def validation_runs(seeds, dataset, tmp_path, monkeypatch):
    """Whatever the run's seed, it is measured on the same held-out training images and fits only the
    others; the test set's arrays are never read; its history, metrics and config name the validation."""
    images = data.Images("mnist", dataset.x_train, dataset.y_train, Untouchable(), Untouchable(), dataset.source,
                         "cache", dataset.checksums)
    fitted, measured = [], []
    real_train, real_eval = data.train_dataset, data.test_dataset
    monkeypatch.setattr(data, "train_dataset", lambda x, *a, **k: fitted.append(x) or real_train(x, *a, **k))
    monkeypatch.setattr(data, "test_dataset", lambda x, *a, **k: measured.append(x) or real_eval(x, *a, **k))
    train_idx, held = data.validation_split(dataset.y_train, 500, 256)
    for seed in seeds:
        result = train(TrainConfig(norm="group", epochs=1, train_size=256, validation=500, seed=seed),
                       tmp_path / str(seed), dataset=images)
        assert set(result.history[0]) == set(history_keys("validation"))
        assert "final_validation_accuracy" in result.metrics and "final_test_accuracy" not in result.metrics
        stored = json.loads(result.run.config.read_text())
        assert (stored["validation_images"], stored["validation_seed"], stored["train_images"]) == (500, 0, 256)
        assert "test_images" not in stored and stored["config"]["validation"] == 500
        assert RunDir(result.run.path).read_history() == result.history  # read back whole
    for x in measured:
        np.testing.assert_array_equal(x, dataset.x_train[held])  # the same images for both seeds
    for x in fitted:
        np.testing.assert_array_equal(x, dataset.x_train[train_idx])  # none of them held out
    assert len(measured) == len(fitted) == len(seeds)
