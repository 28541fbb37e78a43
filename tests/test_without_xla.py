"""A TensorFlow without XLA (tensorflow-metal on a Mac's GPU is the common one) trains: normtf.xla
finds out once that XLA cannot compile and runs the same expressions as TensorFlow's own ops.
Here XLA is made unavailable by a tf.function(jit_compile=True) that raises when called, as a
TensorFlow without an XLA backend for the device does."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from normtf import data, quiet, xla
from normtf.config import TrainConfig
from normtf.dropout import Dropout
from normtf.norms import NORMS
from normtf.training import prepare, resolve_device

HERE = Path(__file__).parent

# Run in a subprocess by the --verbose test: XLA made unavailable, then normtf's command line.
WITHOUT_XLA = """
import sys
from test_without_xla import make_xla_unavailable
make_xla_unavailable()
from normtf.cli import app
sys.argv = ["normtf", *sys.argv[1:]]
app()
"""


def make_xla_unavailable(patch=setattr) -> list:
    """From now on every tf.function(jit_compile=True) raises when called, and normtf.xla starts
    over (its probe not yet made, nothing compiled); `patch` is setattr or monkeypatch.setattr.
    Returns the list of those calls."""
    real, calls = tf.function, []

    def no_xla(*args, jit_compile=None, **kwargs):
        if not jit_compile:
            return real(*args, jit_compile=jit_compile, **kwargs)

        def compile_fails(*a, **k):
            calls.append(args)
            raise tf.errors.UnimplementedError(None, None, "XLA is not available in this build")

        return compile_fails if args else lambda fn: compile_fails

    patch(tf, "function", no_xla)
    patch(xla, "_available", None)
    patch(xla, "_COMPILED", {})
    return calls


@pytest.fixture
def without_xla(monkeypatch):
    return make_xla_unavailable(monkeypatch.setattr)


@pytest.fixture
def fresh_xla(monkeypatch):
    """normtf.xla starting over with XLA as it is here (it compiles)."""
    monkeypatch.setattr(xla, "_available", None)
    monkeypatch.setattr(xla, "_COMPILED", {})


def test_the_probe_finds_xla_here_and_compiles(fresh_xla):
    assert xla.available()
    assert xla.compiled(np.add) is not np.add


def test_without_xla_the_probe_says_no_once_and_the_expressions_run_as_they_are(without_xla):
    assert not xla.available() and not xla.available()
    assert len(without_xla) == 1  # one probe, never asked again
    assert xla.compiled(np.add) is np.add


def test_the_verbose_line_says_which(without_xla, monkeypatch, capsys):
    monkeypatch.setattr(quiet, "verbose", True)
    xla.available()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["normtf: XLA cannot compile here (UnimplementedError: XLA is not available in this build): "
                   "dropout's mask and the norm layers' expressions run as TensorFlow's own ops"]


def test_auto_jit_is_off_on_a_gpu_without_xla(without_xla, monkeypatch):
    """--jit auto compiles the whole step with XLA on a GPU; where XLA cannot compile, it does not."""
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert resolve_device(TrainConfig(jit="auto")).jit is False
    assert resolve_device(TrainConfig(jit="on")).jit is True  # asked for: XLA's own error says why it fails


def _mask(rate, seed, shape=(64, 24, 24, 14)):
    return Dropout(rate, seed=seed)(tf.ones(shape), training=True).numpy()


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_without_xla_draws_the_same_unbiased_mask(rate, fresh_xla, monkeypatch):
    """The same hash as TensorFlow's integer ops, one pass each: the XLA path's mask, bit for bit,
    and so its keep fraction (within 4 sigma of 1 - rate) and mean (1: unbiased)."""
    with_xla = _mask(rate, seed=7)
    monkeypatch.setattr(xla, "_available", False)
    monkeypatch.setattr(xla, "_COMPILED", {})
    plain = _mask(rate, seed=7)
    np.testing.assert_array_equal(plain, with_xla)
    kept = (plain != 0).mean()
    sigma = np.sqrt(rate * (1 - rate) / plain.size)
    assert abs(kept - (1 - rate)) < 4 * sigma
    assert abs(plain.mean() - 1.0) < 4 * sigma / (1 - rate)


def _one_step(norm, images, labels):
    """Every weight (and batch norm's moving statistics) after one training step of a fresh model."""
    model, device, _ = prepare(TrainConfig(norm=norm, precision="float32", jit="off", dropout=0.1))
    assert not device.jit
    model.fit(images, labels, batch_size=len(labels), epochs=1, shuffle=False, verbose=0)
    return [np.asarray(w, np.float64) for w in model.get_weights()]


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_every_variant_trains_a_step_without_xla_as_with_it(norm, dataset, fresh_xla, monkeypatch):
    """One training step of each variant (dropout on, the fused blocks) with XLA and without:
    the same weights to float32 rounding (the same dropout mask; the expressions' operations in
    TensorFlow's order instead of XLA's loop; measured: at most 1.0e-6 of an array's largest
    value, for batch norm, 2.6e-7 for layer-c)."""
    images = data.normalized(dataset.x_train[:32], dataset.mean, dataset.std)
    labels = dataset.y_train[:32]
    with_xla = _one_step(norm, images, labels)
    calls = make_xla_unavailable(monkeypatch.setattr)
    keras.backend.clear_session()
    without = _one_step(norm, images, labels)
    assert len(calls) == 1 and xla.available() is False  # the probe, and nothing compiled since
    assert len(without) == len(with_xla) >= 8  # at least the eight kernels: none has no norm weights
    for a, b in zip(with_xla, without):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1e-6))


@pytest.mark.slow
def test_normtf_verbose_train_without_xla_says_so_and_trains(tmp_path):
    """`normtf --verbose train` where XLA cannot compile: one line says so, and the run finishes."""
    command = [sys.executable, "-c", WITHOUT_XLA, "--verbose", "train", "--norm", "group", "--epochs", "1",
               "--train-size", "512", "--test-size", "200", "--runs-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE.parent,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("normtf: XLA")]
    assert said == ["normtf: XLA cannot compile here (UnimplementedError: XLA is not available in this build): "
                    "dropout's mask and the norm layers' expressions run as TensorFlow's own ops"]
    assert (tmp_path / "group" / "model.keras").exists()
