import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One TensorFlow thread per pool, here and in every normtf process a test starts (they inherit the
# environment): the suite runs two test processes on CI's two cores, and each TensorFlow sizing its
# pools to both cores made four busy threads spin for two cores. test_training.py with
# test_interrupt.py took 263 s before, 234 s so. (`normtf --threads` is tested on its own.)
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from normtf import data  # noqa: E402


# Files that train models, longest first in each tier (the fast one by default, the slow one with
# `-m slow`; docs/development.md), by a --durations run of the tier (the fast one's: 2026-12-05):
# pytest-xdist hands out whole files (--dist loadfile) in collection order, so starting with the
# long ones keeps both workers busy to the end, instead of one training file running alone after
# the other has finished.
LONGEST_FIRST = {
    "fast": ["test_cli.py", "test_layers.py", "test_training.py", "test_bench.py", "test_evaluate.py", "test_fashion.py",
             "test_sweep.py", "test_tune.py", "test_report.py", "test_data.py", "test_model_files.py", "test_grid.py",
             "test_quartet.py", "test_gpu_config.py", "test_evaluate_run.py", "test_tensorboard.py", "test_logs.py",
             "test_figures.py", "test_interrupt.py", "test_bad_values.py", "test_explain.py", "test_renorm.py",
             "test_distributed.py", "test_runs.py"],
    "slow": ["test_distributed.py", "test_cluster.py", "test_grid.py", "test_tune.py", "test_two_worker_reruns.py",
             "test_interrupt.py", "test_gpu_config.py", "test_model_files.py", "test_results.py", "test_report.py",
             "test_sweep.py", "test_explain.py", "test_evaluate.py", "test_training.py", "test_cli.py"],
}


def pytest_collection_modifyitems(config, items):
    order = LONGEST_FIRST["slow" if config.getoption("markexpr") == "slow" else "fast"]
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


@pytest.fixture(scope="session")
def dataset():
    """Real MNIST (from the cache `normtf data` fills, fetched if missing)."""
    return data.load("mnist")


@pytest.fixture(scope="session")
def mnist_dir(dataset):
    return dataset.source


@pytest.fixture(scope="session")
def test_batch(dataset):
    """32 real test images, normalized as the model sees them."""
    return data.normalized(dataset.x_test[:32], dataset.mean, dataset.std)


def copy_idx(src, dst, names=None):
    """Copy (some of) the four raw IDX files into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names or data.IDX_NAMES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def small_idx_dir(dataset, dst, n_train=600, n_test=200):
    """A directory of small, valid IDX files cut from real MNIST (not the standard checksums)."""
    dst.mkdir(parents=True, exist_ok=True)
    arrays = [dataset.x_train[:n_train], dataset.y_train[:n_train], dataset.x_test[:n_test], dataset.y_test[:n_test]]
    for name, array in zip(data.IDX_NAMES, arrays):
        (dst / name).write_bytes(data.idx_bytes(np.asarray(array)))
    return dst


@pytest.fixture(scope="session")
def fashion():
    """Real Fashion-MNIST (from the cache `normtf data --dataset fashion-mnist` fills, fetched if missing)."""
    return data.load("fashion-mnist")
