"""tf.distribute on this machine: the CPU split into 2 logical devices stands in for 2 GPUs."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_scenario(*args):
    out = subprocess.run([sys.executable, str(HERE / "two_cpus.py"), *map(str, args)], capture_output=True,
                         text=True, timeout=600, cwd=HERE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sync_bn_uses_the_global_batch_and_plain_bn_each_replicas_own():
    found = run_scenario("bn")
    assert found["sync"]["replicas"] == found["no_sync"]["replicas"] == 2
    # Synchronized: the same numbers as one device on the whole batch of 8.
    assert found["sync"]["max_output_difference"] < 1e-4
    assert found["sync"]["max_moving_mean_difference"] < 1e-5
    # Not synchronized: each replica normalizes its 4 images with their own statistics.
    assert found["no_sync"]["max_output_difference"] > 1e-2


def test_training_under_mirrored_strategy_runs_and_converges(tmp_path):
    found = run_scenario("train", tmp_path)
    assert found["replicas"] == 2 and len(found["test_losses"]) == 2
    first, second = found["test_losses"]
    assert second < first and found["accuracy"] >= 0.6  # 4,000 images, 2 epochs; chance is 0.1


def test_multi_worker_strategy_without_tf_config_trains_as_one_worker(tmp_path):
    found = run_scenario("multi-worker", tmp_path)
    # CollectiveAllReduceStrategy is the class behind tf.distribute.MultiWorkerMirroredStrategy.
    assert found == {"strategy": "CollectiveAllReduceStrategy", "status": "finished"}
