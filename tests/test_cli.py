import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest
from typer.testing import CliRunner

from normtf.cli import app
from normtf.config import RECIPES
from normtf.norms import NORMS as NORMS_ALL
from normtf import figures
from normtf.console import console

ROOT = Path(__file__).parent.parent
TINY = ["--epochs", "1", "--train-size", "1000", "--test-size", "500"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_help_lists_the_commands_without_installing():
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "80"})
    listed = {line.split()[0]: line for line in out.stdout.split("Commands:")[1].strip().splitlines()}
    assert set(listed) == {"train", "compare", "gallery", "data", "evaluate", "explain", "diagrams", "sweep", "tune",
                           "bench", "report"}
    assert not [line for line in listed.values() if line.endswith("...")]  # no description cut short
    assert out.stderr == ""


@pytest.mark.slow  # 12 s; the fast tier runs `python cli.py --help` (above)
def test_cli_py_trains_from_a_copy_with_the_copys_code(tmp_path):
    """README: `python cli.py ...` does the same from a clone without installing. A copy of the
    package, marked by its version, trains a run: the run records the copy's version, so the
    copy's code ran, not the normtf installed here."""
    import shutil

    copy = tmp_path / "clone"
    shutil.copytree(ROOT / "normtf", copy / "normtf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "cli.py", copy)
    init = copy / "normtf" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "copy-'))
    result = subprocess.run([sys.executable, "cli.py", "train", "--norm", "group", *TINY], cwd=copy,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "group epoch  1/1" in result.stdout, result.stdout + result.stderr
    stored = json.loads((copy / "runs" / "group" / "config.json").read_text())
    assert stored["normtf"]["version"].startswith("copy-") and (copy / "runs" / "group" / "model.keras").is_file()


def test_help_says_what_each_option_takes():
    train_help = " ".join(run("train", "--help").output.split())
    assert "--recipe <reference|tuned|best>" in train_help and "--jit <auto|on|off>" in train_help
    assert "--schedule <constant|one-cycle>" in train_help and "<bool>" not in train_help
    assert "--force Retrain" in train_help  # a flag shows no value placeholder
    assert "pip install 'normtf[bench]'" in " ".join(run("bench", "--help").output.split())


def test_every_recipe_flag_the_readme_lists_is_in_train_and_compare_help():
    readme = " ".join((ROOT / "README.md").read_text().split())
    listed = readme.split("`train` and `compare` take the recipe flags (")[1].split(")")[0]
    flags = re.findall(r"`(--[a-z-]+)`", listed)
    assert len(flags) >= 15 and "--sync-bn" in flags
    for command in ("train", "compare"):
        shown = set(re.findall(r"--[a-z-]+", run(command, "--help").output))
        assert set(flags) - shown == set(), command
    assert "evaluate [OPTIONS] {PATH}" in run("evaluate", "--help").output  # Typer's braces: required


def test_data_command_says_where_mnist_is(mnist_dir):
    result = run("data")
    assert result.exit_code == 0 and str(mnist_dir) in result.output.replace("\n", "")


@pytest.mark.slow
def test_train_compare_gallery_write_their_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's commands as typed: runs/ (and its img/) in the current directory
    runs, img = Path("runs"), Path("runs/img")
    result = run("train", "--norm", "group", *TINY)
    assert result.exit_code == 0, result.output
    assert "9,910" in result.output and "group epoch  1/1" in result.output
    for name in ["config.json", "history.json", "history.csv", "metrics.json", "model.keras"]:
        assert (runs / "group" / name).is_file()

    result = run("compare", "--norm", "group", "--norm", "layer", *TINY)
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "66,974" in result.output
    assert (img / "loss_accuracy.png").stat().st_size > 20_000
    assert sorted(p.name for p in img.glob("misclassified_*.png")) == ["misclassified_group.png",
                                                                        "misclassified_layer.png"]

    (img / "misclassified_layer.png").unlink()
    result = run("gallery", "--norm", "layer", "--count", "5")
    assert result.exit_code == 0 and (img / "misclassified_layer.png").is_file()

    result = run("evaluate", runs / "layer")  # on the run's own test set (TINY's 500 images)
    assert result.exit_code == 0 and "confusion matrix" in result.output and "of 500 correct" in result.output


@pytest.mark.slow
def test_compare_all_trains_every_variant_of_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's main job as typed, on a tiny budget
    result = run("compare", "--all", *TINY)
    assert result.exit_code == 0, result.output
    # Files named after the variant, one for each of --all's: every variant in the table.
    assert sorted(p.name for p in Path("runs/img").glob("misclassified_*.png")) == sorted(
        f"misclassified_{x}.png" for x in NORMS_ALL)


def test_gallery_without_runs_names_the_command_to_run(tmp_path):
    result = run("gallery", "--runs-dir", tmp_path)
    assert result.exit_code == 1 and "normtf compare --all" in result.output


def test_unknown_norm_lists_the_valid_names():
    output = " ".join(run("train", "--norm", "weight").output.split())
    assert "'batch-l1', 'batch', 'layer', 'group', 'layer-c'" in output


def test_missing_data_dir_and_unwritable_runs_dir_are_clear_errors(tmp_path):
    result = run("train", "--data-dir", tmp_path / "nowhere", "--runs-dir", tmp_path)
    assert result.exit_code == 1 and "does not exist" in result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run("train", *TINY, "--runs-dir", blocker / "runs")
    assert result.exit_code == 1 and "choose a writable --runs-dir" in result.output


def test_evaluate_refuses_missing_truncated_and_foreign_files(tmp_path):
    assert "no model at" in run("evaluate", tmp_path / "model.keras").output
    (tmp_path / "notes.keras").write_text("not a model")
    result = run("evaluate", tmp_path / "notes.keras")
    assert result.exit_code == 1 and "not a readable .keras model file" in result.output


def test_evaluate_refuses_a_truncated_model(tmp_path):
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(tmp_path / "whole.keras")
    raw = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(raw[: len(raw) // 2])
    result = run("evaluate", tmp_path / "cut.keras")
    assert result.exit_code == 1 and "truncated or corrupt" in result.output


def test_a_model_carrying_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"

    name = str(marker)
    leave_a_mark = lambda x: (open(name, "w").close(), x * 2)[1]  # noqa: E731  (runs again if loading runs code)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Lambda(leave_a_mark), keras.layers.Dense(10)])
    assert marker.exists()
    model.save(tmp_path / "lambda.keras")
    with zipfile.ZipFile(tmp_path / "lambda.keras") as archive:
        assert "Lambda" in archive.read("config.json").decode()
    marker.unlink()
    result = run("evaluate", tmp_path / "lambda.keras")
    assert result.exit_code == 1 and "carries code" in result.output and not marker.exists()


def test_explain_prints_the_statistics_of_each_norm_layer(monkeypatch):
    monkeypatch.setattr(console, "width", 200)
    result = run("explain", "--norm", "group", "--norm", "batch", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "H, W, 7 of 14 channels (per sample and group)" in text and "N, H, W (per channel)" in text
    assert "yes: moving statistics" in text


def test_diagrams_are_drawn(tmp_path):
    result = run("diagrams", "--img-dir", tmp_path)
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["BatchNorm.png", "GroupNorm.png", "InstanceNorm.png",
                                                              "LayerNorm.png"]


def test_compare_shows_a_diverged_run_as_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(console, "width", 200)
    result = run("compare", "--norm", "batch", *TINY, "--lr", "1e12", "--runs-dir", tmp_path, "--img-dir", tmp_path)
    assert result.exit_code == 3, result.output  # a scheduler must not take a failed run for success
    assert "failed: loss not finite at epoch 1, step" in result.output and "no figures" in result.output
    assert "1 of 1 runs failed" in " ".join(result.output.split())
    assert not (tmp_path / "loss_accuracy.png").exists()


@pytest.mark.parametrize("command", [["train", "--norm", "batch", *TINY],
                                     ["sweep", "--norm", "batch", "--batch-sizes", "64", "--seeds", "1", *TINY]])
def test_train_and_sweep_exit_3_when_a_run_diverged(tmp_path, command):
    """docs/how-it-works.md's exit code 3 (a run failed), from the two commands besides compare."""
    sweep_files = ["--img-dir", tmp_path / "img", "--out", tmp_path / "sweep.json"] if command[0] == "sweep" else []
    result = run(*command, "--lr", "1e12", "--runs-dir", tmp_path / "runs", *sweep_files)
    assert result.exit_code == 3, result.output
    assert "failed:" in result.output and "1 of 1 runs failed" in " ".join(result.output.split())


@pytest.mark.slow
def test_seeds_give_one_run_each_and_a_mean_with_spread(tmp_path, monkeypatch):
    monkeypatch.setattr(console, "width", 200)
    runs, img = tmp_path / "runs", tmp_path / "img"
    result = run("compare", "--norm", "group", "--norm", "batch", "--seeds", "2", *TINY, "--runs-dir", runs,
                 "--img-dir", img)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (runs / "group").iterdir()) == ["seed-42", "seed-43"]
    assert (runs / "batch" / "seed-43" / "metrics.json").is_file()
    assert result.output.count("±") >= 6 and "42, 43" in result.output
    assert (img / "loss_accuracy.png").is_file() and (img / "misclassified_group.png").is_file()
    result = run("train", "--norm", "group", "--seeds", "42,43", *TINY, "--runs-dir", runs)
    assert result.exit_code == 0 and result.output.count("already holds this finished run") == 2


@pytest.mark.parametrize("seeds", ["0", "4x", "1,,2", "42", "11"])  # a count is 1 to 10
def test_bad_seeds_are_usage_errors(seeds):
    result = run("train", "--seeds", seeds)
    assert result.exit_code == 2 and "--seeds" in result.output


def test_a_seed_typed_as_a_count_points_to_seed():
    result = run("compare", "--norm", "group", "--seeds", "42")
    assert result.exit_code == 2 and "--seed 42" in " ".join(result.output.split())


@pytest.mark.slow
def test_gallery_on_a_truncated_model_is_a_clear_error(tmp_path):
    runs = tmp_path / "runs"
    assert run("train", "--norm", "layer-c", *TINY, "--runs-dir", runs).exit_code == 0
    model = runs / "layer-c" / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    result = run("gallery", "--runs-dir", runs, "--img-dir", tmp_path)
    assert result.exit_code == 1 and "not a readable .keras model file" in result.output


def test_settings_a_variant_ignores_do_not_make_its_run_stale(tmp_path):
    runs = tmp_path / "runs"
    assert run("train", "--norm", "layer-c", *TINY, "--runs-dir", runs).exit_code == 0
    result = run("train", "--norm", "layer-c", *TINY, "--l1", "0.01", "--groups", "1", "--runs-dir", runs)
    assert result.exit_code == 0 and "already holds this finished run" in result.output


def test_a_run_that_would_replace_a_finished_one_is_refused_before_any_training(tmp_path):
    runs = tmp_path / "runs"
    assert run("train", "--norm", "layer-c", *TINY, "--runs-dir", runs).exit_code == 0
    result = run("compare", "--norm", "batch", "--norm", "layer-c", *TINY, "--lr", "0.02", "--runs-dir", runs,
                 "--img-dir", tmp_path)
    assert result.exit_code == 2 and "lr 0.01 -> 0.02" in " ".join(result.output.split())
    assert not (runs / "batch").exists()  # refused before batch, the first variant, trained


@pytest.mark.slow
def test_a_failed_run_is_replaced_without_force(tmp_path):
    runs = tmp_path / "runs"
    run("train", "--norm", "batch", *TINY, "--lr", "1e12", "--runs-dir", runs)
    result = run("train", "--norm", "batch", *TINY, "--runs-dir", runs)
    assert result.exit_code == 0 and "trained" in result.output


def test_tuned_recipe_sets_its_values_and_given_flags_override_them(tmp_path):
    runs = tmp_path / "runs"
    result = run("train", "--norm", "batch-l1", "--recipe", "tuned", "--epochs", "1", "--train-size", "1000",
                 "--test-size", "500", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    stored = json.loads((runs / "batch-l1" / "config.json").read_text())["config"]
    tuned = RECIPES["tuned"]
    assert stored["epochs"] == 1  # given on the command line
    assert {k: stored[k] for k in tuned if k != "epochs"} == {k: v for k, v in tuned.items() if k != "epochs"}
    assert run("train", "--recipe", "fast").exit_code == 2


def test_train_on_a_validation_split_is_measured_and_shown_on_it(tmp_path):
    """`train --validation N`, as normtf tune's trials train: the held-out images measure the run, the
    table says so, and its records are the split's (the test set is not evaluated: tests/test_tune.py)."""
    runs = tmp_path / "runs"
    result = run("train", "--norm", "group", "--epochs", "1", "--train-size", "256", "--validation", "500",
                 "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output and "final val" in result.output
    history = json.loads((runs / "group" / "history.json").read_text())
    assert "validation_accuracy" in history[0] and "test_accuracy" not in history[0]
    assert json.loads((runs / "group" / "config.json").read_text())["config"]["validation"] == 500


@pytest.mark.slow  # two TensorFlow processes: 15 s
def test_commands_start_without_tensorflow_lines_unless_verbose():
    """TensorFlow's C++ start-up lines (cuInit and friends) stay hidden on a CPU machine."""
    command = [sys.executable, "-m", "normtf", "evaluate", "results/tuned/group/seed-42", "--test-size", "500"]
    quiet = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "accuracy" in quiet.stdout
    assert quiet.stderr == ""
    verbose = subprocess.run([*command[:3], "--verbose", *command[3:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert verbose.returncode == 0 and verbose.stderr != ""  # the same run, its lines shown


@pytest.mark.slow  # two training processes: 21 s
def test_threads_sets_tensorflows_pools_and_is_recorded(tmp_path):
    """`normtf --threads 1 train ...` in its own process (the pools can be set only before
    TensorFlow starts): TensorFlow reports the size, and the run's config.json records it; a run
    without the option records 0 (TensorFlow's default: one per core)."""
    command = [sys.executable, "-m", "normtf", "--threads", "1", "train", "--norm", "group", *TINY,
               "--runs-dir", str(tmp_path / "one")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    stored = json.loads((tmp_path / "one" / "group" / "config.json").read_text())
    assert stored["environment"]["threads"] == {"intra_op": 1, "inter_op": 1}

    assert run("train", "--norm", "group", *TINY, "--runs-dir", tmp_path / "default").exit_code == 0
    stored = json.loads((tmp_path / "default" / "group" / "config.json").read_text())
    assert stored["environment"]["threads"] == {"intra_op": 0, "inter_op": 0}

    result = run("--threads", "0", "train", "--norm", "group")
    assert result.exit_code == 2 and "--threads" in result.output


@pytest.mark.slow
def test_two_compares_side_by_side_then_one_that_draws_them_together(tmp_path, monkeypatch):
    """README: two `normtf --threads 1 compare ...` side by side (other variants, same directories)
    each draw their own runs, and a last `normtf compare` naming all of them reuses them and draws
    them together; `--force` then retrains the one it names, leaving the other alone."""
    runs, img = tmp_path / "runs", tmp_path / "img"
    where = ["--runs-dir", str(runs), "--img-dir", str(img)]
    processes = [subprocess.Popen([sys.executable, "-m", "normtf", "--threads", "1", "compare", "--norm", norm, *TINY,
                                   *where], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for norm in ("group", "layer-c")]
    for process in processes:
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0 and "Traceback" not in output, output
    assert sorted(p.name for p in img.glob("misclassified_*.png")) == ["misclassified_group.png", "misclassified_layer-c.png"]
    finished = {norm: (runs / norm / "metrics.json").read_bytes() for norm in ("group", "layer-c")}

    drawn = []
    real_plot = figures.plot_curves
    monkeypatch.setattr(figures, "plot_curves", lambda curves, *args, **kwargs: drawn.append(list(curves)) or
                        real_plot(curves, *args, **kwargs))
    monkeypatch.setattr(console, "width", 200)
    result = run("compare", "--norm", "group", "--norm", "layer-c", *TINY, *where)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") >= 2 and "trained" not in result.output
    assert drawn == [["group", "layer-c"]] and (img / "loss_accuracy.png").stat().st_size > 20_000
    assert {norm: (runs / norm / "metrics.json").read_bytes() for norm in finished} == finished

    result = run("compare", "--norm", "group", "--force", *TINY, *where)
    assert result.exit_code == 0 and "trained" in result.output, result.output
    assert (runs / "group" / "metrics.json").read_bytes() != finished["group"]
    assert (runs / "layer-c" / "metrics.json").read_bytes() == finished["layer-c"]


def test_the_img_dir_check_leaves_another_process_probe_alone(tmp_path):
    """What made one of two compares started together fail: each checked --img-dir by writing and
    removing the same probe file, so one removed the other's."""
    from normtf.outputs import writable

    other = tmp_path / ".normtf-write-test"
    other.write_text("another process's")
    assert writable(tmp_path, "--img-dir") == tmp_path
    assert other.read_text() == "another process's" and sorted(p.name for p in tmp_path.iterdir()) == [other.name]


def test_exit_codes_are_the_documented_ones():
    from normtf import cli

    readme = " ".join((ROOT / "docs" / "how-it-works.md").read_text().split())  # its exit-code table
    for code, meaning in [(cli.EXIT_ERROR, "1"), (cli.EXIT_USAGE, "2"), (cli.EXIT_RUN_FAILED, "3"),
                          (cli.EXIT_INTERRUPTED, "130")]:
        assert str(code) == meaning and f"| {code} |" in readme


def test_the_results_table_of_all_variants_and_three_seeds_fits_80_columns():
    """What `normtf compare --all --seeds 3` prints at the end, in an 80-column terminal: every
    variant's name whole, each mean ± std on one line, a failed seed said as such, "best" defined."""
    from types import SimpleNamespace

    from rich.console import Console

    from normtf.console import results_table

    def result(norm, seed, accuracy, status="finished"):
        metrics = {"status": status, "trainable_params": 66_974 if norm == "layer" else 9_910,
                   "final_test_accuracy": accuracy, "best_test_accuracy": accuracy + 0.001, "best_epoch": 17,
                   "final_test_loss": 0.123456, "mean_epoch_time": 154.3}
        if status == "failed":
            metrics["failure"] = {"epoch": 3, "step": 120}
        return SimpleNamespace(metrics=metrics, reused=False, config=SimpleNamespace(seed=seed, evaluated_on="test"))

    groups = {norm: [result(norm, 42 + i, 0.9844 + i / 1000) for i in range(3)] for norm in NORMS_ALL}
    groups["batch"][2] = result("batch", 44, 0.1, status="failed")
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(results_table(groups, title="normtf compare"))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in "".join(lines)
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in groups] == list(groups)
    text = "\n".join(lines)
    assert "98.54 ± 0.10%" in text and "42–44" in text
    assert "highest test accuracy over its epochs, picked on the test set" in " ".join(text.split())
    column = next(line for line in lines if "status" in line).index("status")  # the last column, read down
    assert "failed: loss not finite at epoch 3, step 120" in " ".join(" ".join(line[column:] for line in lines).split())
