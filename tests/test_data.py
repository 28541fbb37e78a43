import gzip

import numpy as np
import pytest

from conftest import copy_mnist, small_idx_dir
from normtf import data as mnist
from normtf.errors import DataError


def test_real_mnist_has_the_standard_shapes_and_checksums(dataset, mnist_dir):
    assert dataset.x_train.shape == (60000, 28, 28) and dataset.x_test.shape == (10000, 28, 28)
    assert dataset.x_train.dtype == np.uint8 and set(np.unique(dataset.y_train)) == set(range(10))
    for name, digest in mnist.FILES.items():
        assert mnist.sha256((mnist_dir / name).read_bytes()) == digest


def test_idx_reader_round_trips_raw_and_gzip(dataset, tmp_path):
    raw = mnist.idx_bytes(dataset.x_test[:5])
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(mnist.parse_idx(mnist.read_idx_bytes(tmp_path / "a.gz")), dataset.x_test[:5])
    labels = mnist.parse_idx(mnist.idx_bytes(dataset.y_test[:7]))
    assert labels.shape == (7,) and labels.tolist() == dataset.y_test[:7].tolist()


@pytest.mark.parametrize("cut, message", [(10, "truncated inside its header"), (2, "truncated"),
                                          (-1, "truncated: 3935 bytes")])
def test_idx_reader_rejects_truncated_files(dataset, cut, message):
    raw = mnist.idx_bytes(dataset.x_test[:5])
    with pytest.raises(DataError, match=message):
        mnist.parse_idx(raw[:cut], "t10k-images-idx3-ubyte")


def test_idx_reader_rejects_wrong_magic_and_extra_bytes(dataset):
    raw = mnist.idx_bytes(dataset.x_test[:5])
    with pytest.raises(DataError, match="magic number 0x00000804"):
        mnist.parse_idx(b"\x00\x00\x08\x04" + raw[4:], "x")
    with pytest.raises(DataError, match="longer than its header says"):
        mnist.parse_idx(raw + b"\x00", "x")


def test_user_dir_with_other_data_is_used_with_a_warning(dataset, tmp_path):
    directory = small_idx_dir(dataset, tmp_path / "mine")
    warnings = []
    loaded = mnist.load_mnist(directory, warn=warnings.append)
    assert loaded.x_train.shape == (600, 28, 28) and loaded.x_test.shape == (200, 28, 28)
    assert len(warnings) == 4 and all("SHA-256 differs" in w for w in warnings)


def test_user_dir_problems_are_clear_errors(dataset, mnist_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        mnist.load_mnist(tmp_path / "nowhere")
    partial = copy_mnist(mnist_dir, tmp_path / "partial", ["train-images-idx3-ubyte"])
    with pytest.raises(DataError, match="has no train-labels-idx1-ubyte"):
        mnist.load_mnist(partial)
    mismatched = small_idx_dir(dataset, tmp_path / "mismatch")
    (mismatched / "t10k-labels-idx1-ubyte").write_bytes(mnist.idx_bytes(dataset.y_test[:150]))
    with pytest.raises(DataError, match="disagree"):
        mnist.load_mnist(mismatched)
    wrong_magic = small_idx_dir(dataset, tmp_path / "magic")
    labels = wrong_magic / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(DataError, match=f"{labels} is truncated"):
        mnist.load_mnist(wrong_magic)  # a label file claiming to hold 3-D images
    (wrong_magic / "train-labels-idx1-ubyte").write_bytes(b"GIF89a" + b"\x00" * 600)
    with pytest.raises(DataError, match="is not an unsigned-byte IDX file"):
        mnist.load_mnist(wrong_magic)
    truncated = small_idx_dir(dataset, tmp_path / "truncated")
    path = truncated / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{path} is truncated"):
        mnist.load_mnist(truncated)


def test_corrupt_cache_file_is_fetched_again_with_a_warning(mnist_dir, tmp_path):
    cache = copy_mnist(mnist_dir, tmp_path / "cache")
    damaged = cache / "t10k-labels-idx1-ubyte"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1  # still a well-formed IDX file, but not the real one
    damaged.write_bytes(bytes(raw))
    warnings = []
    assert mnist.ensure_mnist(cache_dir=cache, warn=warnings.append) == cache
    assert "does not match its SHA-256" in warnings[0]
    assert "fetching it" in warnings[1]  # a download is never silent
    assert mnist.sha256(damaged.read_bytes()) == mnist.FILES["t10k-labels-idx1-ubyte"]


def test_stratified_subset_keeps_class_proportions_and_is_seeded(dataset):
    idx = mnist.stratified_subset(dataset.y_train, 20000, seed=42)
    assert len(idx) == len(set(idx)) == 20000
    expected = np.bincount(dataset.y_train) / 3
    assert np.abs(np.bincount(dataset.y_train[idx]) - expected).max() <= 1
    np.testing.assert_array_equal(idx, mnist.stratified_subset(dataset.y_train, 20000, seed=42))
    assert not np.array_equal(idx, mnist.stratified_subset(dataset.y_train, 20000, seed=43))
    with pytest.raises(DataError):
        mnist.stratified_subset(dataset.y_test, 10001, seed=0)


def test_test_pipeline_shapes_dtypes_and_normalization(dataset):
    batches = list(mnist.test_dataset(dataset.x_test, dataset.y_test, 1000))
    x = np.concatenate([b[0].numpy() for b in batches])
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32 and batches[0][1].dtype.name == "int32"
    # Normalized with the training set's mean and std: the test set lands close to 0 and 1.
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    np.testing.assert_allclose(x.min(), -mnist.MEAN / mnist.STD, rtol=1e-6)


def test_train_pipeline_rotates_shuffles_and_replays_an_epoch_exactly(dataset):
    x, y = dataset.x_train[:512], dataset.y_train[:512]
    two_epochs = list(mnist.train_dataset(x, y, 128, seed=1, rotation=8.0, first_epoch=0, epochs=2))
    assert len(two_epochs) == 8 and two_epochs[0][0].shape == (128, 28, 28, 1)
    resumed = list(mnist.train_dataset(x, y, 128, seed=1, rotation=8.0, first_epoch=1, epochs=2))
    for (xa, ya), (xb, yb) in zip(two_epochs[4:], resumed):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    labels = [np.sort(np.concatenate([b[1].numpy() for b in two_epochs[e * 4:(e + 1) * 4]])) for e in range(2)]
    np.testing.assert_array_equal(labels[0], np.sort(y))  # every image once per epoch
    first_labels = [two_epochs[0][1].numpy(), two_epochs[4][1].numpy()]
    assert not np.array_equal(*first_labels)  # reshuffled each epoch

    unrotated = list(mnist.train_dataset(x, y, 512, seed=1, rotation=0.0, first_epoch=0, epochs=1))[0]
    rotated = list(mnist.train_dataset(x, y, 512, seed=1, rotation=8.0, first_epoch=0, epochs=1))[0]
    np.testing.assert_array_equal(unrotated[1].numpy(), rotated[1].numpy())
    a, b = unrotated[0].numpy(), rotated[0].numpy()
    changed = (a != b).reshape(512, -1).any(axis=1)
    # Nearest-pixel sampling (as torchvision's default in the reference) leaves a digit unchanged
    # when |angle| is below about 3 degrees: roughly a third of uniform +-8 degrees.
    assert 0.5 < changed.mean() < 0.85
    background = -mnist.MEAN / mnist.STD
    ink = lambda v: (v > background + 1e-3).sum(axis=(1, 2, 3))  # noqa: E731
    assert np.abs(ink(a) - ink(b)).mean() / ink(a).mean() < 0.1  # a small rotation keeps the digit


def test_normalized_is_what_the_test_pipeline_yields(dataset):
    x, _ = next(iter(mnist.test_dataset(dataset.x_test[:64], dataset.y_test[:64], 64)))
    np.testing.assert_array_equal(mnist.normalized(dataset.x_test[:64]), x.numpy())


def test_another_idx_dataset_must_still_fit_the_model(dataset, tmp_path):
    directory = small_idx_dir(dataset, tmp_path / "other")
    (directory / "train-images-idx3-ubyte").write_bytes(mnist.idx_bytes(dataset.x_train[:600, :20, :20]))
    with pytest.raises(DataError, match=r"\(20, 20\) images .* the model takes 28x28 images of 10 classes"):
        mnist.load_mnist(directory)
