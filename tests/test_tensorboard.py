"""--tensorboard: the event files hold every epoch's train and test scalars; without TensorBoard
installed the user is told so before anything is loaded or written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--norm", "layer-c", "--epochs", "2", "--train-size", "256", "--test-size", "100"]


def scalars(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {epoch index: value}} from the event files of one TensorBoard run directory."""
    import tensorflow as tf

    found: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":  # not the model's config, written as text
                    found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return found


@pytest.mark.slow
def test_tensorboard_logs_hold_every_epochs_train_and_test_scalars(tmp_path):
    out = subprocess.run(["normtf", "train", *TINY, "--tensorboard", "--runs-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "layer-c"
    history = json.loads((run / "history.json").read_text())
    train, test = scalars(run / "tensorboard" / "train"), scalars(run / "tensorboard" / "validation")
    for epoch, record in enumerate(history):
        assert abs(train["epoch_loss"][epoch] - record["train_objective"]) < 1e-6
        assert abs(train["epoch_accuracy"][epoch] - record["train_accuracy"]) < 1e-6
        assert abs(test["epoch_loss"][epoch] - record["test_loss"]) < 1e-6  # layer-c: no L1, loss is the cross-entropy
        assert abs(test["epoch_accuracy"][epoch] - record["test_accuracy"]) < 1e-6
    assert sorted(train["epoch_loss"]) == sorted(test["epoch_accuracy"]) == [0, 1]


BLOCK_TENSORBOARD = """
import sys

class NoTensorBoard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorboard":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTensorBoard())
from normtf.cli import main
sys.argv = ["normtf", *sys.argv[1:]]
main()
"""


def test_without_tensorboard_the_run_is_refused_before_it_starts(tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCK_TENSORBOARD, "train", *TINY, "--tensorboard",
                          "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], out.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # nothing written, no data loaded: refused first
