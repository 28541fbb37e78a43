"""normtf sweep: every (variant, batch size) over several seeds in seed-<s>/ runs, reused on a rerun;
the summary's statistics; batch norm measured again with precise statistics; the figure's bands,
the table, the committed one-seed file, and --seeds through the command."""

import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from rich.console import Console
from typer.testing import CliRunner

from normtf import data, figures
from normtf.cli import app
from normtf.config import TrainConfig
from normtf.console import sweep_table
from normtf.errors import UsageError
from normtf.evaluation import evaluate, load_model
from normtf.precise_bn import precise_statistics
from normtf.sweep import (draw_sweep, run_sweep, summarize, sweep_configs, sweep_legend_title, sweep_lines,
                          sweep_title)

ROOT = Path(__file__).parent.parent
BASE = TrainConfig(epochs=1, train_size=512, test_size=500)
SEEDS = [42, 43]
TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "500"]


class Trains(keras.callbacks.Callback):
    """Counts the training runs it is given to (a reused run never starts one)."""
    started = 0

    def on_train_begin(self, logs=None):
        Trains.started += 1


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Batch and group norm at batch 16 and 64, seeds 42 and 43, on a tiny budget: eight runs, for
    the slow tier (the fast one sweeps less, test_a_small_sweep_through_the_command_...)."""
    tmp = tmp_path_factory.mktemp("sweep")
    summary = run_sweep(["batch", "group"], [16, 64], BASE, True, tmp / "runs", tmp / "sweep.json", SEEDS)
    return tmp, summary


def test_learning_rate_scales_linearly_with_batch_size():
    configs = sweep_configs(["batch", "group"], [128, 2, 32], TrainConfig(), scale_lr=True)
    assert [(c.batch_size, c.norm, c.lr) for c in configs] == [
        (2, "batch", 0.01 * 2 / 128), (2, "group", 0.01 * 2 / 128), (32, "batch", 0.0025), (32, "group", 0.0025),
        (128, "batch", 0.01), (128, "group", 0.01)]
    assert {c.lr for c in sweep_configs(["batch"], [2, 128], TrainConfig(), scale_lr=False)} == {0.01}
    with pytest.raises(UsageError):
        sweep_configs(["batch"], [0, 8], TrainConfig(), scale_lr=True)
    # a seed's whole sweep before the next seed's
    configs = sweep_configs(["batch", "group"], [8, 2], TrainConfig(), True, seeds=[7, 5])
    assert [(c.seed, c.batch_size, c.norm) for c in configs] == [
        (7, 2, "batch"), (7, 2, "group"), (7, 8, "batch"), (7, 8, "group"),
        (5, 2, "batch"), (5, 2, "group"), (5, 8, "batch"), (5, 8, "group")]


@pytest.mark.slow
def test_a_row_per_seed_in_seed_directories_and_the_summary_is_numpys(swept):
    tmp, summary = swept
    assert json.loads((tmp / "sweep.json").read_text()) == summary
    assert summary["seeds"] == SEEDS and "seed" not in summary
    assert [(r["batch_size"], r["norm"], r["seed"]) for r in summary["rows"]] == [
        (size, norm, seed) for size in (16, 64) for norm in ("batch", "group") for seed in SEEDS]
    for row in summary["rows"]:
        run = tmp / "runs" / f"batch-{row['batch_size']}" / row["norm"] / f"seed-{row['seed']}"
        assert json.loads((run / "config.json").read_text())["config"]["seed"] == row["seed"]
        assert row["status"] == "finished" and (run / "model.keras").is_file()
        assert not (run.parent / "model.keras").exists()
    assert len({r["test_error_percent"] for r in summary["rows"]}) > 1  # the seeds did differ somewhere

    assert [(p["batch_size"], p["norm"]) for p in summary["summary"]] == [
        (16, "batch"), (16, "group"), (64, "batch"), (64, "group")]
    for point in summary["summary"]:
        rows = [r for r in summary["rows"] if (r["norm"], r["batch_size"]) == (point["norm"], point["batch_size"])]
        assert point["seeds"] == SEEDS and point["lr"] == rows[0]["lr"]
        for key in ["test_error_percent", "test_error_percent_precise_bn"]:
            if point["norm"] == "group":
                assert point["test_error_percent_precise_bn"] is None
                continue
            errors = np.array([r[key] for r in rows])
            assert point[key] == pytest.approx({"mean": errors.mean(), "std": errors.std(ddof=1),
                                                "min": errors.min(), "max": errors.max()}, abs=1e-12)


@pytest.mark.slow
def test_batch_norm_rows_carry_the_error_with_precise_statistics(swept, dataset):
    _, summary = swept
    for row in summary["rows"]:
        precise = row["test_error_percent_precise_bn"]
        if row["norm"] == "batch":
            assert isinstance(precise, float) and math.isfinite(precise) and 0 <= precise <= 100
            assert round(precise * 5) == pytest.approx(precise * 5, abs=1e-6)  # a count of the 500 test images
        else:
            assert precise is None

    # The run's own training images at its batch size, the run's test images: done by hand here.
    tmp, _ = swept
    row = next(r for r in summary["rows"] if (r["norm"], r["batch_size"], r["seed"]) == ("batch", 16, 43))
    model = load_model(tmp / "runs" / "batch-16" / "batch" / "seed-43")
    test = data.stratified_subset(dataset.y_test, 500)
    normalization = (dataset.mean, dataset.std)
    moving = evaluate(model, dataset.x_test[test], dataset.y_test[test], normalization)
    assert 100 * (1 - moving.accuracy) == pytest.approx(row["test_error_percent"], abs=1e-6)  # the same test set
    train = data.stratified_subset(dataset.y_train, 512)
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert precise_statistics(model, data.normalized(dataset.x_train[train], *normalization), 16, seed=43) == len(layers) > 0
    recomputed = evaluate(model, dataset.x_test[test], dataset.y_test[test], normalization)
    assert 100 * (1 - recomputed.accuracy) == pytest.approx(row["test_error_percent_precise_bn"], abs=1e-6)


@pytest.mark.slow
def test_a_rerun_reuses_every_run_and_a_one_seed_sweeps_run_where_it_is(swept):
    tmp, summary = swept
    models = sorted((tmp / "runs").rglob("model.keras"))
    before = {path: path.stat().st_mtime_ns for path in models}
    Trains.started = 0
    again = run_sweep(["batch", "group"], [16, 64], BASE, True, tmp / "runs", tmp / "again.json", SEEDS,
                      callbacks_for=lambda config: [Trains()])
    assert Trains.started == 0
    assert {path: path.stat().st_mtime_ns for path in models} == before
    assert again == summary  # the precise statistics computed anew, to the same numbers

    # A sweep from before --seeds kept its run in batch-<size>/<norm>/ itself: used there, not retrained.
    legacy = tmp / "legacy"
    shutil.copytree(tmp / "runs" / "batch-16" / "group" / "seed-42", legacy / "batch-16" / "group")
    one = run_sweep(["group"], [16], BASE, True, legacy, tmp / "one.json", [42], callbacks_for=lambda config: [Trains()])
    assert Trains.started == 0 and not (legacy / "batch-16" / "group" / "seed-42").exists()
    assert one["rows"] == [r for r in summary["rows"] if (r["norm"], r["batch_size"], r["seed"]) == ("group", 16, 42)]


def drawn_axes(lines, title, legend_title=None):
    figure = figures.sweep_figure(lines, title, legend_title)
    FigureCanvasAgg(figure).draw()
    return figure, figure.axes[0]


@pytest.mark.slow
def test_the_figure_draws_a_band_per_variant_and_a_dashed_precise_line(swept, tmp_path):
    tmp, summary = swept
    lines = sweep_lines(summary)
    assert list(lines) == ["batch", "batch (precise statistics)", "group"]
    assert lines["batch"]["label"] == "batch (moving averages)"
    point = summary["summary"][0]
    assert lines["batch"]["errors"][0] == point["test_error_percent"]["mean"]
    assert (lines["batch"]["low"][0], lines["batch"]["high"][0]) == (point["test_error_percent"]["min"],
                                                                     point["test_error_percent"]["max"])
    figure, ax = drawn_axes(lines, sweep_title(summary), sweep_legend_title(summary))
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2  # batch's and group's bands
    assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "--", "-"]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        "batch (moving averages)", "batch (precise statistics)", "group"]
    assert figure.legends[0].get_title().get_text() == "lines: mean of 2 seeds; bands: lowest to highest seed"
    assert "MNIST" in sweep_title(summary) and "1 epoch of 512 images" in sweep_title(summary)
    assert sweep_title(summary).endswith("seeds 42, 43")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64"]
    assert draw_sweep(summary, tmp_path / "sweep.png").stat().st_size > 10_000


# A sweep file as normtf wrote it before `--seeds` (the one-seed sweep committed on 2026-11-24, two of
# its batch sizes): one row per point, no seed per row, the seed at the top.
ONE_SEED_SWEEP = {
    "budget": {"epochs": 2, "test_size": 10000, "train_size": 20000}, "lr_scaled": True, "reference_batch": 128,
    "seed": 42, "rows": [
        {"batch_size": size, "lr": 0.01 * size / 128, "mean_epoch_time": 30.0, "norm": norm, "status": "finished",
         "test_accuracy": 1 - error / 100, "test_error_percent": error}
        for size, errors in [(2, (8.16, 4.25, 4.01)), (128, (5.31, 5.95, 4.33))]
        for norm, error in zip(("batch", "layer", "group"), errors)]}


def test_a_one_seed_sweep_from_before_seeds_still_draws(tmp_path):
    summary = json.loads(json.dumps(ONE_SEED_SWEEP))
    lines = sweep_lines(summary)
    assert set(lines) == {row["norm"] for row in summary["rows"]}  # no precise line, no band: one seed
    assert all(line["low"] is None for line in lines.values())
    assert sweep_title(summary).endswith(f"seed {summary['seed']}")
    assert sweep_legend_title(summary) is None
    _, ax = drawn_axes(lines, sweep_title(summary))
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert draw_sweep(summary, tmp_path / "sweep.png").stat().st_size > 10_000
    assert summary == ONE_SEED_SWEEP  # drawing does not change the summary


def table_text(summary, width=120) -> list[str]:
    console = Console(width=width, record=True)
    console.print(sweep_table(summary))
    return console.export_text().splitlines()


@pytest.mark.slow
def test_the_table_has_mean_std_and_each_seed_and_a_precise_column(swept):
    _, summary = swept
    lines = table_text(summary)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 120
    assert "precise BN" in text and "seeds 42, 43" in " ".join(text.split())
    for point in summary["summary"]:
        stats = point["test_error_percent"]
        each = " ".join(f"{r['test_error_percent']:.2f}" for r in summary["rows"]
                        if (r["norm"], r["batch_size"]) == (point["norm"], point["batch_size"]))
        assert f"{stats['mean']:.2f} ± {stats['std']:.2f}" in text and each in text
    header = next(line for line in lines if "size" in line)  # "batch size" in two lines: the table fits 80 columns
    assert header.index("batch") < header.index("group")


def test_the_table_title_counts_epochs_in_words_that_read_and_marks_failed_seeds():
    rows = [{"norm": "batch", "batch_size": 8, "seed": 1, "lr": 0.1, "status": "finished", "test_error_percent": 3.5,
             "test_error_percent_precise_bn": 3.0},
            {"norm": "batch", "batch_size": 8, "seed": 2, "lr": 0.1, "status": "failed", "test_error_percent": None,
             "test_error_percent_precise_bn": None}]
    for epochs, phrase in [(1, "after 1 epoch of 512 images"), (2, "after 2 epochs of 512 images")]:
        summary = {"seeds": [1, 2], "budget": {"epochs": epochs, "train_size": 512}, "rows": rows,
                   "summary": summarize(rows)}
        text = " ".join(" ".join(table_text(summary, 200)).split())  # the title wraps at the table's width
        assert phrase in text and "3.50 failed" in text and "3.00 failed" in text
    busy = [rows[0], {**rows[1], "status": "busy"}]  # another normtf process was training it: not a failure
    summary = {"seeds": [1, 2], "budget": {"epochs": 1, "train_size": 512}, "rows": busy, "summary": summarize(busy)}
    assert "3.50 busy" in " ".join(" ".join(table_text(summary, 200)).split())


@pytest.mark.slow
def test_seeds_through_the_command(swept):
    tmp, summary = swept
    out, img = tmp / "cli.json", tmp / "img"
    for seeds in ["2", "42,43"]:  # a count from --seed, or a list: the fixture's runs, reused
        result = CliRunner().invoke(app, ["sweep", "--norm", "group", "--batch-sizes", "16,64", "--seeds", seeds, *TINY,
                                          "--runs-dir", str(tmp / "runs"), "--img-dir", str(img), "--out", str(out)])
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        written = json.loads(out.read_text())
        assert written["seeds"] == SEEDS
        assert written["rows"] == [r for r in summary["rows"] if r["norm"] == "group"]
        assert "±" in result.output and (img / "batch_size_sweep.png").is_file()
    result = CliRunner().invoke(app, ["sweep", "--help"])
    assert "[default: 3]" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["sweep", "--seeds", "42", "--out", str(tmp / "no.json")])
    assert result.exit_code == 2 and "is a count" in result.output and not (tmp / "no.json").exists()


def test_the_committed_sweeps_table_fits_80_columns():
    summary = json.loads((Path(__file__).parent.parent / "results" / "sweep.json").read_text())
    lines = table_text(summary, width=80)
    assert max(map(len, lines)) <= 80 and "…" not in "".join(lines)
    assert "10.35 ± 1.78" in "".join(lines) and "9.54 9.12 12.39" in "".join(lines)  # a seed's values on one line
    # the default six variants, batch norm and batch renormalization with precise columns: eight columns,
    # as two tables under one title
    text = "\n".join(lines)
    assert len([line for line in lines if "size" in line]) == 2 and text.count("Test error (%) after") == 1
    assert " ".join(text.split()).count("precise BN") == 3  # two column headers and the caption (which wraps)
    assert all(norm in text for norm in ["batch", "layer", "group", "none", "batch-renorm", "group-ws"])


@pytest.mark.slow  # 17 s; the fast tier's sweep through the command is --extend's (below)
def test_a_small_sweep_through_the_command_has_a_row_per_seed_and_a_rerun_reuses_them(tmp_path):
    """A small sweep, two runs: batch norm at batch 64, seeds 42 and 43, as a user types it.
    A row per seed in seed directories, the summary NumPy's mean and spread, the error with precise
    statistics, the table and the figure; the same command again trains nothing and writes the same."""
    runs, img, out = tmp_path / "runs", tmp_path / "img", tmp_path / "sweep.json"
    command = ["sweep", "--norm", "batch", "--batch-sizes", "64", "--seeds", "2", *TINY, "--runs-dir", str(runs),
               "--img-dir", str(img), "--out", str(out)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    summary = json.loads(out.read_text())
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in summary["rows"]] == [("batch", 64, 42), ("batch", 64, 43)]
    for row in summary["rows"]:
        assert (runs / "batch-64" / "batch" / f"seed-{row['seed']}" / "model.keras").is_file()
        assert math.isfinite(row["test_error_percent_precise_bn"])
    [point] = summary["summary"]
    for key in ["test_error_percent", "test_error_percent_precise_bn"]:
        errors = np.array([r[key] for r in summary["rows"]])
        assert point[key] == pytest.approx({"mean": errors.mean(), "std": errors.std(ddof=1), "min": errors.min(),
                                            "max": errors.max()}, abs=1e-12)
    assert "±" in result.output and "precise BN" in result.output and (img / "batch_size_sweep.png").is_file()

    models = {path: path.stat().st_mtime_ns for path in runs.rglob("model.keras")}
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert {path: path.stat().st_mtime_ns for path in runs.rglob("model.keras")} == models
    assert json.loads(out.read_text()) == summary


def test_extend_adds_a_variant_and_keeps_the_other_rows_as_they_were(tmp_path):
    """--extend, as the committed sweep grew by none, batch-renorm and group-ws: the new variant's rows
    are trained and added, the old rows are kept word for word (their runs may be long gone), and a
    sweep that measured something else is refused before any run starts."""
    runs, img, out = tmp_path / "runs", tmp_path / "img", tmp_path / "sweep.json"
    flags = ["--batch-sizes", "64", "--seeds", "1", *TINY, "--img-dir", str(img)]
    first = CliRunner().invoke(app, ["sweep", "--norm", "batch", *flags, "--runs-dir", str(runs), "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = json.loads(out.read_text())
    shutil.rmtree(runs)  # the kept rows need no runs

    added = CliRunner().invoke(app, ["sweep", "--norm", "none", *flags, "--runs-dir", str(runs), "--extend", str(out)])
    assert added.exit_code == 0 and "Traceback" not in added.output, added.output
    after = json.loads(out.read_text())  # --out defaults to the extended file
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in after["rows"]] == [("batch", 64, 42), ("none", 64, 42)]
    assert after["rows"][0] == before["rows"][0] and after["summary"][0] == before["summary"][0]
    assert not (runs / "batch-64" / "batch").exists() and (runs / "batch-64" / "none" / "seed-42" / "model.keras").is_file()
    assert after["rows"][1]["normtf"]["version"]  # each new row names the code that trained it
    assert after["rows"][1]["test_error_percent_precise_bn"] is None

    for other, named in [(["--epochs", "2"], "budget"), (["--seeds", "2"], "seeds"), (["--no-scale-lr"], "learning rates")]:
        refused = CliRunner().invoke(app, ["sweep", "--norm", "layer", *flags, *other, "--runs-dir", str(runs),
                                           "--extend", str(out)])
        assert refused.exit_code == 2 and named in refused.output and "Traceback" not in refused.output, refused.output
    assert not (runs / "batch-64" / "layer").exists() and json.loads(out.read_text()) == after
    missing = CliRunner().invoke(app, ["sweep", "--norm", "layer", *flags, "--extend", str(tmp_path / "nothing.json")])
    assert missing.exit_code == 2 and "no such file" in missing.output

