"""normtf sweep: every (variant, batch size) over several seeds in seed-<s>/ runs, reused on a rerun;
the summary's statistics; batch norm measured again with precise statistics, dropout on and off;
the recipe recorded, and --extend refusing another; the figure's panels and bands, the table, the
committed one-seed file, and --seeds through the command."""

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
from normtf.sweep import (draw_sweep, run_sweep, summarize, sweep_configs, sweep_lines, sweep_panels,
                          sweep_title)

ROOT = Path(__file__).parent.parent
BASE = TrainConfig(epochs=1, train_size=512, test_size=500)
SEEDS = [42, 43]
TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "500"]
ERROR, PRECISE, DROPOUT_ON = ("test_error_percent", "test_error_percent_precise_bn",
                              "test_error_percent_precise_bn_dropout_on")  # the JSON's names, written out


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
        for key in [ERROR, PRECISE, DROPOUT_ON]:
            if point["norm"] == "group" and key != ERROR:
                assert point[key] is None
                continue
            errors = np.array([r[key] for r in rows])
            assert point[key] == pytest.approx({"mean": errors.mean(), "std": errors.std(ddof=1),
                                                "min": errors.min(), "max": errors.max()}, abs=1e-12)


@pytest.mark.slow
def test_batch_norm_rows_carry_the_error_with_precise_statistics(swept, dataset):
    _, summary = swept
    assert summary["recipe"] == {"dropout": 0.1}
    for row in summary["rows"]:
        for key in [PRECISE, DROPOUT_ON]:
            precise = row[key]
            if row["norm"] == "batch":
                assert isinstance(precise, float) and math.isfinite(precise) and 0 <= precise <= 100
                assert round(precise * 5) == pytest.approx(precise * 5, abs=1e-6)  # a count of the 500 test images
            else:
                assert precise is None

    # The run's own training images at its batch size, the run's test images: done by hand here.
    tmp, _ = swept
    row = next(r for r in summary["rows"] if (r["norm"], r["batch_size"], r["seed"]) == ("batch", 16, 43))
    test = data.stratified_subset(dataset.y_test, 500)
    normalization = (dataset.mean, dataset.std)
    train = data.normalized(dataset.x_train[data.stratified_subset(dataset.y_train, 512)], *normalization)
    for key, dropout in [(ERROR, None), (PRECISE, False), (DROPOUT_ON, True)]:
        model = load_model(tmp / "runs" / "batch-16" / "batch" / "seed-43")
        if dropout is not None:
            layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
            assert precise_statistics(model, train, 16, seed=43, dropout=dropout) == len(layers) > 0
        evaluation = evaluate(model, dataset.x_test[test], dataset.y_test[test], normalization)
        assert 100 * (1 - evaluation.accuracy) == pytest.approx(row[key], abs=1e-6)  # the same test set


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


def drawn(panels, title):
    figure = figures.sweep_figure(panels, title)
    FigureCanvasAgg(figure).draw()
    return figure


@pytest.mark.slow
def test_the_figure_draws_a_band_per_variant_and_the_batch_norms_three_ways(swept, tmp_path):
    tmp, summary = swept
    lines = sweep_lines(summary)
    assert list(lines) == ["batch", "group"]
    point = summary["summary"][0]
    assert lines["batch"]["errors"][0] == point[ERROR]["mean"]
    assert (lines["batch"]["low"][0], lines["batch"]["high"][0]) == (point[ERROR]["min"], point[ERROR]["max"])
    panels = sweep_panels(summary)
    assert [list(lines) for _, lines, _ in panels] == [
        ["batch", "group"], ["batch: moving averages", "batch: precise, dropout on", "batch: precise, dropout off"]]
    three = panels[1][1]
    assert [three[name]["errors"][0] for name in three] == [point[key]["mean"] for key in (ERROR, DROPOUT_ON, PRECISE)]
    figure = drawn(panels, sweep_title(summary))
    top, bottom = figure.axes
    assert len([c for c in top.collections if isinstance(c, PolyCollection)]) == 2  # batch's and group's bands
    assert not [c for c in bottom.collections if isinstance(c, PolyCollection)]
    assert [line.get_linestyle() for line in bottom.get_lines()] == ["-", ":", "--"]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["batch", "group"]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == list(three)
    assert top.get_legend().get_title().get_text() == "lines: mean of 2 seeds; bands: lowest to highest seed"
    title = " ".join(sweep_title(summary).split())
    assert "MNIST" in title and "1 epoch of 512 images (32 steps at batch 16 to 8 at batch 64)" in title
    assert "dropout 0.1" in title and title.endswith("seeds 42, 43")
    assert [t.get_text() for t in top.get_xticklabels()] == ["16", "64"]
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
    [(_, lines, legend_title)] = sweep_panels(summary)  # no precise statistics: one panel
    assert set(lines) == {row["norm"] for row in summary["rows"]}  # no band: one seed
    assert all(line["low"] is None for line in lines.values())
    assert sweep_title(summary).endswith(f"seed {summary['seed']}") and "dropout" not in sweep_title(summary)
    assert legend_title is None
    [ax] = drawn(sweep_panels(summary), sweep_title(summary)).axes
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert draw_sweep(summary, tmp_path / "sweep.png").stat().st_size > 10_000
    assert summary == ONE_SEED_SWEEP  # drawing does not change the summary


def table_text(summary, width=120) -> list[str]:
    console = Console(width=width, record=True)
    console.print(sweep_table(summary))
    return console.export_text().splitlines()


@pytest.mark.slow
def test_the_table_has_mean_std_and_each_seed_and_the_precise_columns(swept):
    _, summary = swept
    lines = table_text(summary)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 120
    assert "seeds 42, 43" in " ".join(text.split()) and "dropout 0.1" in " ".join(text.split())
    for point in summary["summary"]:
        for key in [ERROR, PRECISE, DROPOUT_ON] if point["norm"] == "batch" else [ERROR]:
            stats = point[key]
            each = " ".join(f"{r[key]:.2f}" for r in summary["rows"]
                            if (r["norm"], r["batch_size"]) == (point["norm"], point["batch_size"]))
            assert f"{stats['mean']:.2f} ± {stats['std']:.2f}" in text and each in text
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("─"))  # under the column headers
    assert [line.split() for line in lines[rule - 3:rule]] == [  # "batch size" in two lines: 80 columns fit four
        ["batch", "batch"], ["batch", "batch", "precise", "precise"],
        ["size", "moving", "averages", "dropout", "on", "dropout", "off", "group"]]


def test_the_table_title_counts_epochs_in_words_that_read_and_marks_failed_seeds():
    """The title says the budget and the recipe's dropout; a failed or busy seed is marked in each
    of its variant's columns, and a measure no row has (dropout on, here) has no column."""
    rows = [{"norm": "batch", "batch_size": 8, "seed": 1, "lr": 0.1, "status": "finished", ERROR: 3.5, PRECISE: 3.0,
             DROPOUT_ON: None},
            {"norm": "batch", "batch_size": 8, "seed": 2, "lr": 0.1, "status": "failed", ERROR: None, PRECISE: None,
             DROPOUT_ON: None}]
    for epochs, phrase in [(1, "after 1 epoch of 512 images, dropout 0, seeds 1, 2"),
                           (2, "after 2 epochs of 512 images, dropout 0, seeds 1, 2")]:
        summary = {"seeds": [1, 2], "budget": {"epochs": epochs, "train_size": 512}, "recipe": {"dropout": 0.0},
                   "rows": rows, "summary": summarize(rows)}
        text = " ".join(" ".join(table_text(summary, 200)).split())  # the title wraps at the table's width
        assert phrase in text and "3.50 failed" in text and "3.00 failed" in text
        head, caption = text.split("precise:")
        assert "dropout off" in head and "dropout on" not in head + caption  # no column, no words
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
    """The committed sweep's table on an 80-column terminal: every cell whole (a seed's values on one
    line), every variant shown, each batch norm with a column per measure it has."""
    summary = json.loads((ROOT / "results" / "sweep.json").read_text())
    lines = table_text(summary, width=80)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80 and "…" not in text and text.count("Test error (%) after") == 1
    rows = {(r["norm"], r["batch_size"], r["seed"]): r for r in summary["rows"]}
    for point in summary["summary"]:
        for key in [ERROR, PRECISE, DROPOUT_ON]:
            if point.get(key):
                assert f"{point[key]['mean']:.2f} ± {point[key]['std']:.2f}" in text
                each = " ".join(f"{rows[point['norm'], point['batch_size'], seed][key]:.2f}" for seed in point["seeds"])
                assert each in text, (point["norm"], point["batch_size"], key)
    moving = {p["norm"] for p in summary["summary"] if p[PRECISE]}
    assert moving == {"batch", "batch-renorm"}
    headers = [line for line in lines if line.strip().startswith("size")]
    assert " ".join(headers).count("dropout off") == len(moving)
    assert " ".join(headers).count("dropout on") == len({p["norm"] for p in summary["summary"] if p.get(DROPOUT_ON)})
    assert all(norm in text for norm in ["batch", "layer", "group", "none", "batch-renorm", "group-ws"])


@pytest.mark.slow  # 17 s; the fast tier's sweep through the command is --extend's (below)
def test_a_small_sweep_through_the_command_has_a_row_per_seed_and_a_rerun_reuses_them(tmp_path):
    """A small sweep, two runs: batch norm at batch 64, seeds 42 and 43, as a user types it.
    A row per seed in seed directories, the summary NumPy's mean and spread, the errors with precise
    statistics (dropout on and off), the table and the figure; the same command again trains nothing
    and writes the same."""
    runs, img, out = tmp_path / "runs", tmp_path / "img", tmp_path / "sweep.json"
    command = ["sweep", "--norm", "batch", "--batch-sizes", "64", "--seeds", "2", *TINY, "--runs-dir", str(runs),
               "--img-dir", str(img), "--out", str(out)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    summary = json.loads(out.read_text())
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in summary["rows"]] == [("batch", 64, 42), ("batch", 64, 43)]
    for row in summary["rows"]:
        assert (runs / "batch-64" / "batch" / f"seed-{row['seed']}" / "model.keras").is_file()
        assert math.isfinite(row[PRECISE]) and math.isfinite(row[DROPOUT_ON])
    [point] = summary["summary"]
    for key in [ERROR, PRECISE, DROPOUT_ON]:
        errors = np.array([r[key] for r in summary["rows"]])
        assert point[key] == pytest.approx({"mean": errors.mean(), "std": errors.std(ddof=1), "min": errors.min(),
                                            "max": errors.max()}, abs=1e-12)
    text = " ".join(result.output.split())
    assert "±" in text and "dropout on" in text and "dropout off" in text and (img / "batch_size_sweep.png").is_file()

    models = {path: path.stat().st_mtime_ns for path in runs.rglob("model.keras")}
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert {path: path.stat().st_mtime_ns for path in runs.rglob("model.keras")} == models
    assert json.loads(out.read_text()) == summary


@pytest.mark.slow
def test_extend_adds_a_variant_and_keeps_the_other_rows_as_they_were(tmp_path):
    """--extend, as the committed sweep grew by none and group-ws: the new variant's rows are trained
    and added, the old rows are kept word for word (their runs may be long gone), and a sweep that
    measured something else (another budget, seeds, learning rates or recipe: the dropout) is
    refused before any run starts, naming each difference."""
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
    assert after["rows"][1][PRECISE] is None and after["rows"][1][DROPOUT_ON] is None
    assert after["recipe"] == before["recipe"] == {"dropout": 0.1}
    assert all(isinstance(after["rows"][0][key], float) for key in [ERROR, PRECISE, DROPOUT_ON])  # batch norm's three
    assert "dropout 0.1" in " ".join(added.output.split())  # the table's title

    for other, named in [(["--epochs", "2"], "budget"), (["--seeds", "2"], "seeds"), (["--no-scale-lr"], "learning rates"),
                         (["--dropout", "0"], "dropout 0.1 there, 0.0 here"), (["--groups", "1"], "groups 2 there, 1 here")]:
        refused = CliRunner().invoke(app, ["sweep", "--norm", "layer", *flags, *other, "--runs-dir", str(runs),
                                           "--extend", str(out)])
        assert refused.exit_code == 2 and named in refused.output and "Traceback" not in refused.output, refused.output
    assert not (runs / "batch-64" / "layer").exists() and json.loads(out.read_text()) == after
    missing = CliRunner().invoke(app, ["sweep", "--norm", "layer", *flags, "--extend", str(tmp_path / "nothing.json")])
    assert missing.exit_code == 2 and "no such file" in missing.output



@pytest.mark.slow  # a run trained; the fast tier has the table's (test_the_table_title_...) and --extend's refusal
def test_a_sweep_without_dropout_records_it_and_has_no_dropout_on_measure(tmp_path):
    """--dropout 0, as results/sweep-dropout-0.json: the recipe says so, a batch-norm row has its error
    with precise statistics and none with dropout on (that pass would be the dropout-off one), and
    the table and the figure say "dropout 0" and show no dropout-on measure. An older file without a
    recipe is the reference recipe's (dropout 0.1), so --extend refuses to mix the two."""
    runs, img, out = tmp_path / "runs", tmp_path / "img", tmp_path / "sweep.json"
    result = CliRunner().invoke(app, ["sweep", "--norm", "batch", "--dropout", "0", "--batch-sizes", "64", "--seeds", "1",
                                      *TINY, "--runs-dir", str(runs), "--img-dir", str(img), "--out", str(out)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    summary = json.loads(out.read_text())
    assert summary["recipe"] == {"dropout": 0.0}
    [row], [point] = summary["rows"], summary["summary"]
    assert isinstance(row[PRECISE], float) and row[DROPOUT_ON] is None and point[DROPOUT_ON] is None
    text = " ".join(result.output.split())
    assert "images, dropout 0, seed 42" in text and "dropout on" not in text and "dropout off" in text
    assert "dropout 0, tested on 500" in " ".join(sweep_title(summary).split())
    assert [list(lines) for _, lines, _ in sweep_panels(summary)] == [
        ["batch"], ["batch: moving averages", "batch: precise, dropout off"]]

    older = {key: value for key, value in summary.items() if key != "recipe"}
    (tmp_path / "older.json").write_text(json.dumps(older))
    refused = CliRunner().invoke(app, ["sweep", "--norm", "none", "--dropout", "0", "--batch-sizes", "64", "--seeds", "1",
                                       *TINY, "--runs-dir", str(runs), "--extend", str(tmp_path / "older.json")])
    assert refused.exit_code == 2 and "dropout 0.1 there, 0.0 here" in " ".join(refused.output.split()), refused.output
