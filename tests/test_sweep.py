import json

import pytest

from normtf.config import TrainConfig
from normtf.errors import UsageError
from normtf.sweep import draw_sweep, run_sweep, sweep_configs


def test_learning_rate_scales_linearly_with_batch_size():
    configs = sweep_configs(["batch", "group"], [128, 2, 32], TrainConfig(), scale_lr=True)
    assert [(c.batch_size, c.norm, c.lr) for c in configs] == [
        (2, "batch", 0.01 * 2 / 128), (2, "group", 0.01 * 2 / 128), (32, "batch", 0.0025), (32, "group", 0.0025),
        (128, "batch", 0.01), (128, "group", 0.01)]
    assert {c.lr for c in sweep_configs(["batch"], [2, 128], TrainConfig(), scale_lr=False)} == {0.01}
    with pytest.raises(UsageError):
        sweep_configs(["batch"], [0, 8], TrainConfig(), scale_lr=True)


def test_sweep_trains_every_pair_writes_json_and_figure(tmp_path, dataset):
    base = TrainConfig(epochs=1, train_size=512, test_size=500)
    out = tmp_path / "sweep.json"
    summary = run_sweep(["batch", "group"], [16, 64], base, True, tmp_path / "runs", out)
    assert json.loads(out.read_text()) == summary
    assert [(r["batch_size"], r["norm"]) for r in summary["rows"]] == [(16, "batch"), (16, "group"),
                                                                        (64, "batch"), (64, "group")]
    assert all(0 <= r["test_error_percent"] <= 100 for r in summary["rows"])
    assert (tmp_path / "runs" / "batch-16" / "group" / "model.keras").is_file()
    assert draw_sweep(summary, tmp_path / "sweep.png").stat().st_size > 10_000


def test_the_sweep_table_title_counts_epochs_in_words_that_read():
    from rich.console import Console

    from normtf.console import sweep_table

    rows = [{"norm": "batch", "batch_size": 8, "status": "finished", "test_error_percent": 3.5}]
    for epochs, phrase in [(1, "after 1 epoch of 512 images"), (2, "after 2 epochs of 512 images")]:
        console = Console(width=200, record=True)
        console.print(sweep_table({"rows": rows, "budget": {"epochs": epochs, "train_size": 512}}))
        assert phrase in " ".join(console.export_text().split())  # the title wraps at the table's width
