"""normtf tune: the validation split (disjoint from the images a run fits, the same whatever the
run's seed, the test set untouched), each variant's search in rounds (reproducible from the seed
whatever --jobs, interruptions or how --trials grew), its table, JSON and figure, --recipe best, and
every bad input in one line and exit 2 with nothing lost."""

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from normtf import data, grid, quiet, tune
from normtf.cli import app
from normtf.config import TrainConfig
from normtf.errors import Interrupted, RunFailed
from normtf.runs import RunDir, history_keys
from normtf.training import TrainResult, train
from processes import default_handling, wait_for

TINY = ["--epochs", "1", "--train-size", "256", "--validation", "500"]


def normtf(*args, **kwargs):
    """`normtf ...` as a user runs it, its output piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "normtf", *map(str, args)], capture_output=True, text=True,
                          timeout=900, **kwargs)


def start(*args):
    """`normtf ...` in the background; SIGINT as a terminal delivers it (see test_interrupt.py)."""
    return subprocess.Popen([sys.executable, "-m", "normtf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_handling(signal.SIGINT))


def snapshot(directory):
    """Every file and directory under `directory`, with the SHA-256 of each file."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def trials_of(database, norm):
    """A variant's trials as the database holds them: (number, state, params, value), read with sqlite3
    (a reader beside the tuning, as another program would read it)."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT t.number, t.state, v.value FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id WHERE s.study_name = ? ORDER BY t.number",
            (norm,)).fetchall()
        params = connection.execute(
            "SELECT t.number, p.param_name, p.param_value FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id "
            "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = ? ORDER BY t.number, p.param_name",
            (norm,)).fetchall()
    return [(number, state, {name: value for n, name, value in params if n == number}, value)
            for number, state, value in rows]


# --- the validation split ------------------------------------------------------------------------

def test_the_validation_split_is_stratified_disjoint_and_train_size_takes_from_the_rest(dataset):
    labels = dataset.y_train
    train_idx, held = data.validation_split(labels, 10_000)
    assert len(held) == 10_000 and len(train_idx) == 50_000 and not np.intersect1d(train_idx, held).size
    assert np.abs(np.bincount(labels[held]) - np.bincount(labels) * 10_000 / 60_000).max() <= 1  # each class in proportion
    subset, same = data.validation_split(labels, 10_000, train_size=1_000)
    np.testing.assert_array_equal(same, held)  # the split is the split, whatever --train-size
    assert len(subset) == 1_000 and np.isin(subset, train_idx).all()


class Untouchable:
    """Stands for the test set in a run with a validation split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test set was touched ({name})")

    def __getitem__(self, key):
        raise AssertionError("the test set was touched")

    def __len__(self):
        raise AssertionError("the test set was touched")


def test_a_run_with_a_validation_split_is_measured_on_it_and_never_touches_the_test_set(dataset, tmp_path,
                                                                                       monkeypatch):
    validation_runs([42], dataset, tmp_path, monkeypatch)


@pytest.mark.slow  # a second run: 10 s
def test_runs_of_other_seeds_are_measured_on_the_same_images(dataset, tmp_path, monkeypatch):
    validation_runs([42, 43], dataset, tmp_path, monkeypatch)


def validation_runs(seeds, dataset, tmp_path, monkeypatch):
    """Whatever the run's seed, it is measured on the same held-out training images and fits only the
    others; the test set's arrays are never read; its history, metrics and config name the validation."""
    images = data.Images("mnist", dataset.x_train, dataset.y_train, Untouchable(), Untouchable(), dataset.source,
                         "cache", dataset.checksums)
    fitted, measured = [], []
    real_train, real_eval = data.train_dataset, data.test_dataset
    monkeypatch.setattr(data, "train_dataset", lambda x, *a, **k: fitted.append(x) or real_train(x, *a, **k))
    monkeypatch.setattr(data, "test_dataset", lambda x, *a, **k: measured.append(x) or real_eval(x, *a, **k))
    train_idx, held = data.validation_split(dataset.y_train, 500, 256)
    for seed in seeds:
        result = train(TrainConfig(norm="group", epochs=1, train_size=256, validation=500, seed=seed),
                       tmp_path / str(seed), dataset=images)
        assert set(result.history[0]) == set(history_keys("validation"))
        assert "final_validation_accuracy" in result.metrics and "final_test_accuracy" not in result.metrics
        stored = json.loads(result.run.config.read_text())
        assert (stored["validation_images"], stored["validation_seed"], stored["train_images"]) == (500, 0, 256)
        assert "test_images" not in stored and stored["config"]["validation"] == 500
        assert RunDir(result.run.path).read_history() == result.history  # read back whole
    for x in measured:
        np.testing.assert_array_equal(x, dataset.x_train[held])  # the same images for both seeds
    for x in fitted:
        np.testing.assert_array_equal(x, dataset.x_train[train_idx])  # none of them held out
    assert len(measured) == len(fitted) == len(seeds)


# --- rounds, resume and reproducibility, with the grid's results computed from the recipe -----------

def fake_grid(calls):
    """grid.run for a tuning without training: each trial's validation accuracy a function of its
    recipe (a peak at lr 0.05), a learning rate above 0.6 diverging. `calls` records each round's runs."""
    def run(runs, jobs=1, cluster=None, options=None, callbacks_for=None, show=False, warn=None, dataset=None):
        calls.append([spec.label for spec in runs])
        results = []
        for spec in runs:
            c = spec.config
            if c.lr > 0.6:
                metrics = {"status": "failed", "failure": {"epoch": 1, "step": 2, "reason": "loss became nan"}}
            else:
                metrics = {"status": "finished", "final_validation_accuracy": 0.99 - 0.02 * abs(math.log10(c.lr / 0.05))
                           - 0.05 * c.dropout + 0.003 * (c.schedule == "one-cycle")}
            results.append(TrainResult(spec.run, c, [], metrics))
        return results
    return run


BASE = TrainConfig(epochs=1, train_size=256, validation=500)
NORMS = ["group", "batch-l1"]


def study(runs_dir):
    database = tune.database(runs_dir, "mnist")
    return {norm: trials_of(database, norm) for norm in NORMS}


@pytest.fixture(scope="session")
def mnist(dataset):
    """MNIST by name, as tune.tune takes it: loaded once for every tuning here."""
    return lambda name: dataset


@pytest.fixture(scope="module")
def straight(tmp_path_factory, mnist):
    """Ten trials of two variants in one go: the study every other way of getting there must equal."""
    runs = tmp_path_factory.mktemp("straight")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grid, "run", fake_grid(calls))
        summary, unfinished = tune.tune(NORMS, BASE, 10, runs, dataset=mnist)
    return runs, calls, summary, unfinished


def test_trials_go_in_rounds_of_every_variant_and_are_told_in_order(straight):
    runs, calls, summary, unfinished = straight
    assert not unfinished
    assert [len(call) for call in calls] == [8, 8, 4]  # rounds of 4 trials of each variant: 4 + 4 + 2 each
    assert calls[0] == [f"{norm} trial {n}" for norm in NORMS for n in range(4)]
    trials = study(runs)
    for norm in NORMS:
        assert [t[0] for t in trials[norm]] == list(range(10))
        assert {t[1] for t in trials[norm]} <= {"COMPLETE", "PRUNED"}
        # diverged trials are told as pruned, without a value
        assert all((t[1] == "PRUNED") == (t[2]["lr"] > 0.6) and (t[3] is None) == (t[1] == "PRUNED") for t in trials[norm])
    best = summary["variants"]["group"]["best"]
    assert best["validation_accuracy"] == max(t[3] for t in trials["group"] if t[3] is not None)
    assert best["run"] == f"trial-{best['number']}/group"
    # the first, random trials of every variant try the same learning rates (a shared random start)
    assert [t[2]["lr"] for t in trials["group"][:tune.STARTUP]] == [t[2]["lr"] for t in trials["batch-l1"][:tune.STARTUP]]
    assert "l1" in trials["batch-l1"][0][2] and "l1" not in trials["group"][0][2]
    assert json.loads((runs / "tune.json").read_text()) == json.loads(json.dumps(summary))


def test_the_study_is_the_same_after_an_interrupted_round_a_kill_while_asking_and_more_trials_later(
        straight, tmp_path, monkeypatch, mnist):
    runs = tmp_path / "runs"
    calls = []
    fake = fake_grid(calls)

    def interrupted(*args, **kwargs):  # the grid stopped by Ctrl-C in round 2: its trials asked, none told
        if len(calls) == 1:
            calls.append("interrupted")
            raise Interrupted("interrupted")
        return fake(*args, **kwargs)
    monkeypatch.setattr(grid, "run", interrupted)
    with pytest.raises(Interrupted):
        tune.tune(NORMS, BASE, 5, runs, dataset=mnist)  # five first (rounds of 4 and 1): the same study once it has ten
    assert [t[0] for t in study(runs)["group"] if t[1] == "RUNNING"] == [4]
    tune.tune(NORMS, BASE, 5, runs, dataset=mnist)
    assert calls[-1] == ["group trial 4", "batch-l1 trial 4"]  # asked before, trained now with its recipe

    real_ask, asked_now = tune._ask, []

    def killed(study_, norm, number, seed):  # the process dies between two asks of a round
        if len(asked_now) == 2:
            raise KeyboardInterrupt
        asked_now.append(number)
        return real_ask(study_, norm, number, seed)
    monkeypatch.setattr(grid, "run", fake)
    monkeypatch.setattr(tune, "_ask", killed)
    with pytest.raises(KeyboardInterrupt):
        tune.tune(NORMS, BASE, 10, runs, dataset=mnist)
    monkeypatch.setattr(tune, "_ask", real_ask)
    summary, unfinished = tune.tune(NORMS, BASE, 10, runs, dataset=mnist)
    assert not unfinished and study(runs) == study(straight[0])  # every trial, recipe and value the same
    assert summary["variants"] == straight[2]["variants"]
    again = len(calls)
    tune.tune(NORMS, BASE, 10, runs, dataset=mnist)
    assert len(calls) == again  # told in full: nothing to train, nothing asked


def test_a_trial_whose_process_died_stays_asked_and_no_later_round_is_asked(tmp_path, monkeypatch, mnist):
    calls = []
    fake = fake_grid(calls)

    def died(runs, *args, **kwargs):
        results = fake(runs, *args, **kwargs)
        results[1] = TrainResult(runs[1].run, runs[1].config, [], {"status": "failed", "failure": {
            "reason": "its process ended (killed by SIGKILL) during training"}})
        return results
    monkeypatch.setattr(grid, "run", died)
    summary, unfinished = tune.tune(["group"], BASE, 8, tmp_path, dataset=mnist)
    assert [r.config.norm for r in unfinished] == ["group"] and len(calls) == 1  # no second round asked
    states = [t[1] for t in trials_of(tune.database(tmp_path, "mnist"), "group")]
    assert len(states) == 4 and states[1] == "RUNNING" and "RUNNING" not in states[:1] + states[2:]
    assert [row["state"] for row in summary["variants"]["group"]["trials"]][1] == "asked"
    with pytest.raises(RunFailed, match="1 trials did not finish: .*trial-1/group .*run the same command again"):
        tune.raise_if_unfinished(unfinished)
    monkeypatch.setattr(grid, "run", fake)
    tune.tune(["group"], BASE, 8, tmp_path, dataset=mnist)
    assert calls[1] == ["group trial 1"] and len(trials_of(tune.database(tmp_path, "mnist"), "group")) == 8


# --- through the command -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny tuning of two variants through the command: a trial each, one epoch of 256 images,
    measured on 500 held out."""
    runs = tmp_path_factory.mktemp("tuned") / "tune"
    result = CliRunner().invoke(app, ["tune", "--norm", "group", "--norm", "batch-l1", "--trials", "1", *TINY,
                                      "--jobs", "1", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    return runs, result.output


def test_tune_prints_a_line_per_trial_then_the_best_recipe_of_each_variant(tuned):
    runs, output = tuned
    lines = output.splitlines()
    assert lines[0].startswith("tuning group, batch-l1: 1 trials each, 1 epoch of 256 training images, measured on "
                               "500 held out; database ")
    summary = json.loads((runs / "tune.json").read_text())
    for norm in ("group", "batch-l1"):
        for row in summary["variants"][norm]["trials"]:
            assert f"{norm} trial {row['number']}: {tune.recipe_text(row['params'])}" in lines
            assert any(line.startswith(f"{norm} trial {row['number']} epoch  1/1  train loss") and "validation loss" in line
                       for line in lines)  # the grid's line per epoch, naming what it measured
            run = RunDir(runs / row["run"])
            config = run.stored_config()
            assert (config.lr, config.schedule, config.dropout, config.validation) == (
                row["params"]["lr"], row["params"]["schedule"], row["params"]["dropout"], 500)
            assert run.read_metrics()["final_validation_accuracy"] == row["validation_accuracy"]
        best = summary["variants"][norm]["best"]
        table = lines[next(i for i, line in enumerate(lines) if line.startswith("Best recipe per variant")):]
        row = next(line for line in table if line.startswith(f"{norm} "))
        assert f"{100 * best['validation_accuracy']:.2f}%" in row and f"{best['params']['lr']:.3g}" in row
    assert "L1" in output and "Optuna" not in output and "[I " not in output  # no Optuna log lines
    assert (runs / "img" / tune.FIGURE).stat().st_size > 10_000
    assert not list(runs.glob(".*lock"))  # the database's lock goes with the command


def test_the_same_tune_again_trains_nothing(tuned, tmp_path):
    runs = shutil.copytree(tuned[0], tmp_path / "tune")
    before = trials_of(runs / "tune.db", "group")
    again = CliRunner().invoke(app, ["tune", "--norm", "group", "--norm", "batch-l1", "--trials", "1", *TINY,
                                     "--jobs", "1", "--runs-dir", str(runs)])
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[1].startswith("Best recipe per variant")  # no trial asked, none trained
    assert trials_of(runs / "tune.db", "group") == before


@pytest.mark.slow
def test_recipe_best_trains_a_variant_with_its_best_trials_recipe(tuned, tmp_path):
    recipe_best(["train", "--norm", "batch-l1"], tuned[0], tmp_path)


@pytest.mark.slow  # two runs and their figures: 20 s
def test_compare_recipe_best_trains_each_variant_with_its_own_best_recipe(tuned, tmp_path):
    recipe_best(["compare", "--norm", "group", "--norm", "batch-l1", "--img-dir", str(tmp_path / "img")], tuned[0],
                tmp_path)
    assert (tmp_path / "img" / "loss_accuracy.png").exists()


def test_the_curves_of_variants_with_recipes_of_their_own_name_each_recipe_in_the_legend(tmp_path, monkeypatch):
    from normtf import figures, study

    results = [TrainResult(RunDir(tmp_path / norm), TrainConfig(norm=norm, lr=lr, schedule="one-cycle", l1=1e-5),
                           [{"epoch": 1, "train_loss": 1.0, "train_objective": 1.0, "train_accuracy": 0.9,
                             "test_loss": 0.5, "test_accuracy": 0.95, "epoch_time": 1.0}],
                           {"status": "finished", "trainable_params": 9910})
               for norm, lr in [("group", 0.1), ("batch-l1", 0.03)]]
    drawn = {}
    monkeypatch.setattr(figures, "plot_curves", lambda runs, path, title, legend: drawn.update(runs=runs, title=title))
    study.draw_curves(results, tmp_path / "curves.png")
    assert drawn["title"].endswith("SGD momentum 0.9, each variant's own recipe (in the legend)")
    assert [run["label"] for run in drawn["runs"].values()] == [
        "group (9,910 params; lr 0.1 one-cycle, dropout 0.1)", "batch-l1 (9,910 params; lr 0.03 one-cycle, dropout 0.1, L1 1e-05)"]


def recipe_best(command, runs, tmp_path):
    summary = json.loads((runs / "tune.json").read_text())
    norms = [command[i + 1] for i, flag in enumerate(command) if flag == "--norm"]
    result = CliRunner().invoke(app, [*command, "--recipe", "best", "--tune-dir", str(runs), "--epochs", "1",
                                      "--train-size", "256", "--test-size", "200", "--lr", "0.02", "--jobs", "1",
                                      "--runs-dir", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    for norm in norms:
        best = summary["variants"][norm]["best"]
        config = RunDir(tmp_path / "best" / norm).stored_config()
        assert (config.schedule, config.dropout, config.l1, config.validation) == (
            best["params"]["schedule"], best["params"]["dropout"], best["params"].get("l1"), None)
        assert config.lr == 0.02  # a flag given overrides the recipe, as for every recipe
        assert f"{norm}: the recipe of trial {best['number']} in {runs}, the best of its 1 finished" in result.output


@pytest.mark.parametrize("args, message", [
    ([], "--recipe best: no tuning in NOWHERE (NOWHERE/tune.db does not exist); tune first (normtf tune --runs-dir "
         "NOWHERE), or name the tuning's --runs-dir with --tune-dir"),
    (["--tune-dir", "TUNED"], "--recipe best: TUNED/tune.db has no finished trial of layer; tune it first: normtf tune "
                              "--norm layer --runs-dir TUNED"),
])
def test_recipe_best_without_a_tuning_of_the_variant_is_one_line_and_exit_1(tuned, tmp_path, args, message):
    nowhere = tmp_path / "nowhere"
    args = [str(tuned[0]) if a == "TUNED" else a for a in args]
    result = CliRunner().invoke(app, ["train", "--norm", "layer", "--recipe", "best", *TINY[:4],
                                      "--runs-dir", str(tmp_path / "runs"), *(args or ["--tune-dir", str(nowhere)])])
    assert result.exit_code == 1, result.output
    expected = message.replace("NOWHERE", str(nowhere)).replace("TUNED", str(tuned[0]))
    assert result.output.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "runs").exists()


# --- bad input: one line, exit 2, nothing lost ------------------------------------------------------

def small_training_set(dataset, directory):
    """600 training images (the first of MNIST's), valid IDX files."""
    from conftest import small_idx_dir

    return small_idx_dir(dataset, directory)


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials must be a whole number from 1 to 10,000 (got 0)"),
    (["--norm", "weight"], "unknown norm 'weight'; choose one of: batch-l1, batch, layer, group"),
    (["--validation", "60000"], "--validation 60,000 leaves none of the 60,000 training images to train on; hold out fewer"),
    (["--validation", "50000", "--train-size", "20000"],
     "--train-size 20,000 is more than the 10,000 training images --validation 50,000 leaves"),
    (["--data-dir", "SMALL", "--validation", "10000"],
     "--validation 10,000 leaves none of the 600 training images to train on; hold out fewer"),
    (["--data-dir", "SMALL", "--validation", "5", "--train-size", "200"],
     "--validation 5: these 600 training images cannot be split by class: the validation split would have no image "
     "of class"),
    (["--epochs", "2"], "holds a tuning of other settings (epochs 1 there, 2 here); use its flags, or tune into another "
                        "--runs-dir"),
    (["--seed", "43", "--validation", "400"], "(seed 42 there, 43 here; validation 500 there, 400 here)"),
    (["--deterministic"], "(deterministic False there, True here)"),
    (["--dataset", "fashion-mnist"], "(dataset mnist there, fashion-mnist here)"),
    (["SPACE"], "(search space of lr [0.001, 1.0, 'log'] there, [0.01, 1.0, 'log'] here)"),
    (["CORRUPT"], "tune.db is not a tuning database normtf can read (file is not a database); move it away to start a "
                  "new tuning, or name another --runs-dir"),
    (["LOCKED"], "another normtf tune (pid PID) is using "),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_a_bad_tune_is_one_line_and_exit_2_and_loses_nothing(tuned, dataset, tmp_path, monkeypatch, args, message):
    runs = shutil.copytree(tuned[0], tmp_path / "tune")
    database = runs / "tune.db"
    if args == ["SPACE"]:  # a tuning made by a normtf that searched other learning rates
        monkeypatch.setitem(tune.TUNE_SPACE, "lr", (0.01, 1.0, "log"))
        args = []
    if args == ["CORRUPT"]:
        database.write_bytes(b"not a database" * 100)
        args = []
    if args == ["--dataset", "fashion-mnist"]:  # MNIST's tuning where Fashion-MNIST's goes (copied there)
        (runs / "fashion-mnist").mkdir()
        shutil.copy(database, runs / "fashion-mnist" / "tune.db")
    if "SMALL" in args:
        args = [str(small_training_set(dataset, tmp_path / "small")) if a == "SMALL" else a for a in args]
    monkeypatch.setattr(quiet, "threads", quiet.threads)  # --deterministic pins it for this process: put it back
    with tune._locked(database) if args == ["LOCKED"] else contextlib.nullcontext():
        before = snapshot(runs)
        args = [a for a in args if a != "LOCKED"]
        tiny = [item for flag, value in zip(TINY[::2], TINY[1::2]) if flag not in args for item in (flag, value)]
        result = CliRunner().invoke(app, ["tune", "--norm", "group", "--norm", "batch-l1", "--trials", "1", *tiny,
                                          *args, "--jobs", "1", "--runs-dir", str(runs)])
        lines = [line for line in result.output.strip().splitlines()  # a --data-dir of other files: a warning each
                 if not (line.startswith("warning: ") and "is not the standard MNIST file" in line)]
        assert result.exit_code == 2, result.output
        message = message.replace("PID", str(os.getpid()))  # the holder here is this process
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
        assert snapshot(runs) == before


# --- stopped and started again, through the command ------------------------------------------------

RESUMABLE = ["tune", "--norm", "group", "--trials", "5", "--epochs", "2", "--train-size", "640", "--validation", "500",
             "--deterministic"]


def epochs_done(run_path) -> int:
    try:
        return len(json.loads((run_path / "history.json").read_text()))
    except (OSError, ValueError):
        return 0



@pytest.mark.slow
def test_ctrl_c_or_a_kill_then_the_same_command_give_the_study_of_one_run_whatever_the_jobs(tmp_path):
    """Five trials of group (a round of 4, then 1), each 2 epochs: once with --jobs 1 uninterrupted; with
    --jobs 2 stopped by Ctrl-C in its first round (a second tune of the same database meanwhile refused)
    and run again; and killed (SIGKILL) in its second round and run again. Each ends with the same five
    trials, recipes and validation accuracies, to the bit, and each trial's epochs once each."""
    one = normtf(*RESUMABLE, "--jobs", "1", "--runs-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr

    two = tmp_path / "two"
    process = start(*RESUMABLE, "--jobs", "2", "--runs-dir", two)
    wait_for(lambda: epochs_done(two / "trial-0" / "group") >= 1, process)
    second = normtf(*RESUMABLE, "--jobs", "2", "--runs-dir", two)
    assert second.returncode == 2 and second.stderr.strip() == (
        f"error: another normtf tune (pid {process.pid}) is using {two / 'tune.db'}; wait for it to finish, or tune "
        "into another --runs-dir"), second.stderr
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: ") and "Traceback" not in err
    assert [t[1] for t in trials_of(two / "tune.db", "group")] == ["RUNNING"] * 4  # asked, none told
    again = normtf(*RESUMABLE, "--jobs", "2", "--runs-dir", two)
    assert again.returncode == 0, again.stderr

    killed = tmp_path / "killed"
    process = start(*RESUMABLE, "--jobs", "2", "--runs-dir", killed)
    wait_for(lambda: epochs_done(killed / "trial-4" / "group") >= 1, process)
    process.kill()
    process.communicate(timeout=60)
    again = normtf(*RESUMABLE, "--jobs", "2", "--runs-dir", killed)
    assert again.returncode == 0, again.stderr

    reference = trials_of(tmp_path / "one" / "tune.db", "group")
    assert len(reference) == 5 and all(t[1] == "COMPLETE" for t in reference)
    for directory in (two, killed):
        assert trials_of(directory / "tune.db", "group") == reference
        for n in range(5):
            assert [r["epoch"] for r in RunDir(directory / f"trial-{n}" / "group").read_history()] == [1, 2]
