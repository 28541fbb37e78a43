"""The committed results behind the README and docs/: the models re-evaluate to their metrics, and
every normtf number in the results tables (docs/results.md, docs/speed.md, the README's headline) is
the one in the committed files."""

import json
import re
import statistics
from pathlib import Path

import pytest

from normtf import data
from normtf.config import TrainConfig, recipe
from normtf.evaluation import evaluate_file
from normtf.norms import NORMS, relevant
from normtf.precise_bn import ERROR as MOVING, PRECISE as OFF, PRECISE_DROPOUT_ON as ON
from normtf.runs import RunDir, dataset_dir

ROOT = Path(__file__).parent.parent
REFERENCE = ROOT / "results" / "reference"
RUNS = sorted(p.name for p in REFERENCE.iterdir() if p.name in NORMS) if REFERENCE.is_dir() else []
SEED = "seed-42"  # the reproduction table's runs; more seeds sit beside them



def readme_rows():
    """{variant: cells} of the seed-42 results table's normtf rows (docs/results.md)."""
    rows = {}
    for line in (ROOT / "docs" / "results.md").read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1] == "normtf":
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_committed_run_is_in_the_readme_table():
    assert RUNS and sorted(readme_rows()) == RUNS


def epoch_list(epochs: list[int]) -> str:
    """"12, 20", or "1–20" for three or more epochs in a row (instance norm is at its best in all 20)."""
    runs = []
    for epoch in epochs:
        if runs and epoch == runs[-1][-1] + 1:
            runs[-1].append(epoch)
        else:
            runs.append([epoch])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) >= 3 else ", ".join(map(str, r)) for r in runs)


@pytest.mark.parametrize("norm", RUNS)
def test_readme_numbers_are_the_committed_ones(norm):
    run = RunDir(REFERENCE / norm / SEED)
    history, metrics = run.read_history(), run.read_metrics()
    _, _, params, first, tenth, last, best, loss = readme_rows()[norm]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    assert params == f"{metrics['trainable_params']:,}"
    assert [first, tenth, last] == [pct(history[e - 1]["test_accuracy"]) for e in (1, 10, 20)]
    best_epochs = [r["epoch"] for r in history if r["test_accuracy"] == metrics["best_test_accuracy"]]
    assert best == f"{pct(metrics['best_test_accuracy'])} ({epoch_list(best_epochs)})"
    assert loss == f"{metrics['final_test_loss']:.4f}"


@pytest.mark.parametrize("norm", RUNS)
def test_committed_reference_runs_are_20_epochs_of_full_mnist(norm):
    config = json.loads(RunDir(REFERENCE / norm / SEED).config.read_text())
    assert config["config"]["epochs"] == 20 and config["train_images"] == 60000 and config["test_images"] == 10000


NORMALIZATION = {"mnist": {"mean": 0.1307, "std": 0.3081}, "fashion-mnist": {"mean": 0.286, "std": 0.353}}


def test_committed_configs_name_their_data_by_checksum_not_by_path():
    for path in (ROOT / "results").rglob("config.json"):
        stored = json.loads(path.read_text())
        name = "fashion-mnist" if "fashion-mnist" in path.parts else "mnist"
        assert stored["data"]["origin"] in ("cache", "Debian package dataset-fashion-mnist"), path
        assert stored["data"] == {"dataset": name, "origin": stored["data"]["origin"],
                                  "sha256": data.DATASETS[name].files, "normalization": NORMALIZATION[name]}, path
        assert stored["config"].get("dataset", "mnist") == name, path


def test_every_committed_run_names_the_code_that_made_it():
    for path in (ROOT / "results").rglob("config.json"):
        code = json.loads(path.read_text()).get("normtf", {})
        assert code.get("version") and re.fullmatch(r"[0-9a-f]{40}", code.get("commit") or ""), path
        if "checks" not in path.parts:  # a check may measure a change before it is committed; a result may not
            assert code["uncommitted_changes"] is False, path


def test_readme_figures_exist():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for name in re.findall(r"\]\(((?:\.\./)?img/[^)]+\.png)\)", page.read_text()):
            assert (page.parent / name).is_file(), (page.name, name)


RECIPE_DIRS = {"reference": REFERENCE, "tuned": ROOT / "results" / "tuned"}
SEED_PAGES = ["README.md", "docs/results.md"]


def seed_rows():
    """[(variant, recipe, dataset, cells)] of the several-seed tables (the README's and those in
    docs/results.md, each copy checked): variant, recipe, params, seeds, final test accuracy
    mean ± std, each seed's final accuracy, mean best accuracy. A table is of Fashion-MNIST when
    the last heading above it names Fashion-MNIST, else of MNIST."""
    rows = []
    for page in SEED_PAGES:
        dataset = "mnist"
        for line in (ROOT / page).read_text().splitlines():
            if line.startswith("#"):
                dataset = "fashion-mnist" if "Fashion-MNIST" in line else "mnist"
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            if len(cells) == 7 and cells[1] in RECIPE_DIRS:
                rows.append((cells[0].strip("`"), cells[1], dataset, cells))
    return rows


def test_the_readme_has_the_several_seed_tables():
    recipes = {recipe for _, recipe, _, _ in seed_rows()}
    assert recipes == {"reference", "tuned"}


@pytest.mark.parametrize("norm,recipe,dataset,cells", seed_rows(), ids=lambda v: v if isinstance(v, str) else "")
def test_several_seed_numbers_are_the_committed_ones(norm, recipe, dataset, cells):
    seeds = [int(s) for s in cells[3].split(",")]
    metrics = [RunDir(dataset_dir(RECIPE_DIRS[recipe], dataset) / norm / f"seed-{s}").read_metrics() for s in seeds]
    assert all(m["status"] == "finished" for m in metrics)
    finals = [100 * m["final_test_accuracy"] for m in metrics]
    spread = f" ± {statistics.stdev(finals):.2f}" if len(finals) > 1 else ""
    assert cells[2] == f"{metrics[0]['trainable_params']:,}"
    assert cells[4] == f"{statistics.fmean(finals):.2f}{spread}"
    assert cells[5] == ", ".join(f"{v:.2f}" for v in finals)
    assert cells[6] == f"{statistics.fmean(100 * m['best_test_accuracy'] for m in metrics):.2f}"


TUNED = sorted(RECIPE_DIRS["tuned"].glob("*/seed-*")) if RECIPE_DIRS["tuned"].is_dir() else []


@pytest.mark.parametrize("path", TUNED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_tuned_runs_are_the_tuned_recipe_on_full_mnist(path):
    run = RunDir(path)
    stored = json.loads(run.config.read_text())
    expected = relevant(recipe("tuned").replace(norm=path.parent.name, seed=int(path.name[5:])))
    assert TrainConfig.from_dict(stored["config"]) == expected
    assert stored["train_images"] == 60000 and stored["test_images"] == 10000
    metrics = run.read_metrics()
    assert metrics["status"] == "finished" and metrics["trainable_params"] <= 10_000
    assert metrics["final_test_accuracy"] == run.read_history()[-1]["test_accuracy"]


def readme_table(header: list[str]) -> dict[str, list[str]]:
    """{first cell: cells} of the docs/speed.md table whose header row starts with `header`."""
    rows, inside = {}, False
    for line in (ROOT / "docs" / "speed.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:len(header)] == header:
            inside = True
        elif inside and line.lstrip().startswith("|") and not cells[0].startswith("---"):
            rows[cells[0]] = cells
        elif inside and not line.lstrip().startswith("|"):
            break
    return rows


def test_readme_speed_table_is_the_committed_benchmark_and_meets_the_targets():
    result = json.loads((ROOT / "results" / "bench.json").read_text())
    rows = readme_table(["variant", "normtf img/s"])
    assert sorted(rows) == sorted(result["variants"]) and len(rows) == 5
    assert result["settings"]["repeats"] >= 3 and not result["settings"]["quick"]
    for norm, v in result["variants"].items():
        ours, theirs = v["normtf"], v["reference"]
        assert rows[norm][1:] == [f"{ours['images_per_second']:,.0f}", f"{theirs['images_per_second']:,.0f}",
                                  f"{v['ratio']:.2f}", f"{ours['peak_rss_mib']:,.0f}", f"{ours['eval_seconds']:.2f}",
                                  f"{v['epoch_seconds']:.1f} s = {v['epoch_vs_floor']:.1f}×",
                                  f"{v['train']['epoch_seconds']:.1f} s = {v['train']['epoch_vs_floor']:.1f}×"]
        assert v["ratio"] >= 1.5 and ours["eval_seconds"] <= 1.0  # the targets
        assert statistics.median(ours["images_per_second_all"]) == ours["images_per_second"]


def test_readme_table_of_three_benchmark_runs_is_the_committed_runs():
    runs = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "bench-runs").glob("*.json"))]
    runs.append(json.loads((ROOT / "results" / "bench.json").read_text()))
    rows = readme_table(["variant", "ratio, run 1"])
    assert len(runs) == 3 and sorted(rows) == sorted(runs[-1]["variants"])
    for norm, cells in rows.items():
        variants = [run["variants"][norm] for run in runs]
        pairs = [a / b for v in variants
                 for a, b in zip(v["normtf"]["images_per_second_all"], v["reference"]["images_per_second_all"])]
        evals = [e for v in variants for e in v["normtf"]["eval_seconds_all"]]
        assert cells[1:] == [f"{v['ratio']:.2f}" for v in variants] + [
            f"{statistics.median(pairs):.2f}", f"{min(pairs):.2f}–{max(pairs):.2f}",
            f"{min(evals):.2f}–{max(evals):.2f}", ", ".join(f"{v['train']['epoch_seconds']:.1f}" for v in variants)]


# docs/speed.md's tables of 20-epoch seed-42 runs retrained after a change to the layers, beside
# the committed seeds: results/checks/<name>/<variant>, and the table's second column header.
CHECKS = {"dropout-hash": "final test acc (%), hashed mask", "xla-norm": "final test acc (%), fused norm"}


def check_rows(name: str) -> dict[str, list[str]]:
    """The check table's rows, each checked against its committed run and the committed seeds."""
    directory = ROOT / "results" / "checks" / name
    rows = {norm.strip("`"): cells for norm, cells in readme_table(["variant", CHECKS[name]]).items()}
    assert sorted(rows) == sorted(p.name for p in directory.iterdir())
    assert set(rows) >= {n for n, spec in NORMS.items() if spec.pytorch}  # the study's five at least: the checks predate the other variants
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    for norm, cells in rows.items():
        run = RunDir(directory / norm)
        stored = json.loads(run.config.read_text())
        assert TrainConfig.from_dict(stored["config"]) == relevant(recipe("reference").replace(norm=norm))
        assert stored["train_images"] == 60000 and stored["test_images"] == 10000
        metrics, history = run.read_metrics(), run.read_history()
        assert metrics["status"] == "finished" and len(history) == 20
        seeds = sorted(REFERENCE.glob(f"{norm}/seed-*"))
        finals = [RunDir(path).read_metrics()["final_test_accuracy"] for path in seeds]
        best_epoch = next(r["epoch"] for r in history if r["test_accuracy"] == metrics["best_test_accuracy"])
        assert cells[1:] == [pct(metrics["final_test_accuracy"]), f"{pct(metrics['best_test_accuracy'])} ({best_epoch})",
                             ", ".join(pct(f) for f in finals), ", ".join(path.name[5:] for path in seeds)]
    return rows


@pytest.mark.parametrize("name", CHECKS)
def test_check_tables_are_the_committed_runs(name):
    check_rows(name)


def test_results_names_the_dropout_checks():
    rows = check_rows("dropout-hash")
    results = " ".join((ROOT / "docs" / "results.md").read_text().split())
    head, last = ", ".join(f"{cells[1]}% (`{norm}`)" for norm, cells in rows.items()).rsplit(", ", 1)
    assert f"retrained with it end at {head} and {last}" in results


FASHION = sorted(path for directory in RECIPE_DIRS.values() for path in directory.glob("fashion-mnist/*/seed-*"))


@pytest.mark.parametrize("path", FASHION, ids=lambda p: f"{p.parents[2].name}/{p.parent.name}/{p.name}")
def test_fashion_runs_are_their_recipe_on_full_fashion_mnist(path):
    run = RunDir(path)
    stored = json.loads(run.config.read_text())
    name = path.parents[2].name  # reference or tuned
    expected = relevant(recipe(name).replace(norm=path.parent.name, seed=int(path.name[5:]), dataset="fashion-mnist"))
    assert TrainConfig.from_dict(stored["config"]) == expected
    assert stored["train_images"] == 60000 and stored["test_images"] == 10000
    metrics = run.read_metrics()
    assert metrics["status"] == "finished"
    assert metrics["final_test_accuracy"] == run.read_history()[-1]["test_accuracy"]


# Every committed model re-evaluates to its stored result (the 66 slow ones: 6 minutes in one process).
# The fast tier re-evaluates the study's run (batch-l1, reference); the slow tier every other one.
REEVALUATED = [*sorted(REFERENCE.glob("*/seed-*")), *TUNED, *FASHION]
STUDYS_RUN = REFERENCE / "batch-l1" / SEED


@pytest.mark.parametrize("path", [path if path == STUDYS_RUN else pytest.param(path, marks=pytest.mark.slow)
                                  for path in REEVALUATED], ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_committed_models_re_evaluate_to_their_metrics(path, dataset, fashion):
    run = RunDir(path)
    metrics = run.read_metrics()
    on = fashion if run.stored_config().dataset == "fashion-mnist" else dataset
    evaluation = evaluate_file(run.model, on)
    assert evaluation.correct == round(metrics["final_test_accuracy"] * 10000)
    assert evaluation.loss == pytest.approx(metrics["final_test_loss"], rel=1e-4)


def sweep_tables() -> list[tuple[list[str], dict[str, list[str]]]]:
    """[(header cells, {batch size: cells})] of docs/results.md's sweep tables: those whose header
    starts with "batch size | lr"."""
    tables, inside = [], False
    for line in (ROOT / "docs" / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["batch size", "lr"]:
            tables.append((cells, {}))
            inside = True
        elif inside and line.startswith("|") and not cells[0].startswith("---"):
            tables[-1][1][cells[0]] = cells
        elif inside and not line.startswith("|"):
            inside = False
    return tables


def sweep_column(header: str) -> str:
    """The sweep field a column of docs/results.md's sweep tables shows, from its words."""
    if "dropout on" in header:
        return ON
    return OFF if "precise" in header else MOVING


def test_the_sweep_tables_are_the_committed_sweep():
    """docs/results.md's sweep tables, cell by cell, against results/sweep.json (and, for the columns
    "no dropout", results/sweep-dropout-0/sweep.json): for every batch size, each column's variant
    ("`group`") with moving averages or precise statistics, with dropout off or on ("`batch`, precise,
    dropout on"), each as "mean ± std (each seed)"; together the tables show every variant of each
    sweep, and every measure it has."""
    files = {"with": ROOT / "results" / "sweep.json", "without": ROOT / "results" / "sweep-dropout-0" / "sweep.json"}
    sweeps = {k: json.loads(path.read_text()) for k, path in files.items()}
    assert sweeps["with"]["recipe"]["dropout"] == 0.1 and sweeps["without"]["recipe"]["dropout"] == 0

    def cell(sweep, norm, size, key):
        runs = {(r["norm"], r["batch_size"], r["seed"]): r for r in sweep["rows"]}
        point = next(p for p in sweep["summary"] if (p["norm"], p["batch_size"]) == (norm, size))
        stats = point[key]
        each = ", ".join(f"{runs[norm, size, s][key]:.2f}" for s in point["seeds"])
        return f"{stats['mean']:.2f} ± {stats['std']:.2f} ({each})"

    tables, shown = sweep_tables(), set()
    assert len(tables) == 3
    for header, found in tables:
        which = "without" if all("no dropout" in h for h in header[2:]) else "with"
        sweep = sweeps[which]
        sizes = sorted({p["batch_size"] for p in sweep["summary"]})
        assert sweep["seeds"] == [42, 43, 44] and len(sizes) == 7
        columns = [(h.split("`")[1], sweep_column(h)) for h in header[2:]]
        shown |= {(which, norm, key) for norm, key in columns}
        lrs = {p["batch_size"]: p["lr"] for p in sweep["summary"]}
        expected = {str(size): [str(size), f"{lrs[size]:g}", *(cell(sweep, n, size, k) for n, k in columns)]
                    for size in sizes}
        assert found == expected
    for which, sweep in sweeps.items():
        measured = {(which, p["norm"], key) for p in sweep["summary"] for key in
                    (MOVING, OFF, ON)
                    if p.get(key) is not None}
        assert shown >= measured and {n for w, n, _ in shown if w == which} == {p["norm"] for p in sweep["summary"]}


def test_the_readme_sweep_paragraph_is_the_committed_sweep():
    """The README's numbers on batch norm at small batches, computed from results/sweep.json and
    results/sweep-dropout-0/sweep.json, with the separations it claims (ranges that do not overlap,
    or that do) checked too."""
    sweep = json.loads((ROOT / "results" / "sweep.json").read_text())
    without = json.loads((ROOT / "results" / "sweep-dropout-0" / "sweep.json").read_text())
    points = {(p["norm"], p["batch_size"]): p for p in sweep["summary"]}
    points0 = {(p["norm"], p["batch_size"]): p for p in without["summary"]}
    error = lambda norm, size, key=MOVING, at=points: at[norm, size][key]  # noqa: E731
    sizes = sorted({p["batch_size"] for p in sweep["summary"]})
    larger = [size for size in sizes if size >= 4]
    text = (ROOT / "README.md").read_text()
    paragraph = " ".join(text[text.index("**Why batch norm fails at small batches**"):].split("\n\n")[0].split())
    span = lambda values: f"{min(values):.2f}–{max(values):.2f}%"  # noqa: E731
    apart = lambda a, b: a["max"] < b["min"] or b["max"] < a["min"]  # noqa: E731
    budget = sweep["budget"]
    assert f"{budget['epochs']} epochs of {budget['train_size']:,} images: 20,000 steps at batch 2, 314 at 128" in paragraph
    assert budget["epochs"] * -(-budget["train_size"] // 2) == 20_000 and budget["epochs"] * -(-budget["train_size"] // 128) == 314
    assert f"{error('batch', 2)['mean']:.2f}% at batch 2" in paragraph
    assert f"{error('layer', 2)['mean']:.2f}% for layer norm and {error('group', 2)['mean']:.2f}% for group" in paragraph
    assert error("batch", 2)["min"] > max(error("layer", 2)["max"], error("group", 2)["max"])  # do not overlap
    assert f"and {span([error('batch', s)['mean'] for s in larger])} from batch 4 up" in paragraph
    # the averaging (moving against precise with dropout on) and the variance shift (dropout on against off)
    averaging = {s: error("batch", s)["mean"] - error("batch", s, ON)["mean"] for s in sizes}
    assert max(abs(v) for s, v in averaging.items() if s != 64) <= 0.45 < averaging[64]
    assert "by 0.45 points or less but at batch 64" in paragraph
    assert f"bring it to {span([error('batch', s, OFF)['mean'] for s in larger])} from batch 4 up and " \
           f"{error('batch', 2, OFF)['mean']:.2f}% at batch 2" in paragraph
    shift = {s: error("batch", s, ON)["mean"] - error("batch", s, OFF)["mean"] for s in sizes}
    assert all(shift[s] > averaging[s] for s in sizes)  # "most of that": the shift is the larger part everywhere
    # without dropout
    assert without["recipe"]["dropout"] == 0 and without["seeds"] == sweep["seeds"] and without["budget"] == budget
    assert f"Trained with `--dropout 0`, batch norm is at {error('batch', 2, at=points0)['mean']:.2f}% at batch 2 and " \
           f"{span([error('batch', s, at=points0)['mean'] for s in larger])} from batch 4 up" in paragraph
    assert not any(apart(error("batch", s, at=points0), error("batch", s, OFF, at=points0)) for s in sizes if s <= 64)
    assert apart(error("batch", 128, at=points0), error("batch", 128, OFF, at=points0))
    # the fixes and the control
    assert f"(`group-ws`) is at {error('group-ws', 2)['mean']:.2f}% at batch 2, level with group norm" in paragraph
    assert not apart(error("group-ws", 2), error("group", 2))
    others = [points[norm, 2][key] for norm in ("batch", "layer", "none", "batch-renorm")
              for key in (MOVING, ON, OFF) if points[norm, 2].get(key)]
    assert error("group-ws", 2)["max"] < min(other["min"] for other in others)  # ahead of the rest
    assert "batch renormalization does not help here" in paragraph
    assert all(not apart(error("batch-renorm", s, OFF), error("batch", s, OFF)) for s in sizes)
    assert f"{error('none', 2)['mean']:.2f}% at batch 2 to {error('none', 128)['mean']:.2f}% at 128" in paragraph


@pytest.mark.slow
def test_the_readmes_results_command_reuses_the_committed_runs(tmp_path, monkeypatch):
    """The command under the README's results table, on a copy of the committed runs: every run is
    reused (none retrains: the stored configs are what the command asks for) and the table it
    prints has the README's numbers."""
    import shutil

    import keras
    from typer.testing import CliRunner

    from normtf.cli import app

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"normtf (compare --norm batch-l1 [^\n`]*--seeds 3 --runs-dir results/reference[^\n`]*)", readme)
    args = command.group(1).split()
    runs = tmp_path / "results" / "reference"
    shutil.copytree(REFERENCE, runs, ignore=shutil.ignore_patterns("fashion-mnist"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("a committed run was trained again"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for norm in [args[i + 1] for i, arg in enumerate(args) if arg == "--norm"]:  # every variant it names
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{norm}` | reference |"))
        mean, each = [c.strip() for c in row.strip("|").split("|")][4:6]
        assert mean.replace(" ", "") in result.output.replace(" ", ""), (norm, mean)
    assert (tmp_path / "img" / "seeds" / "loss_accuracy.png").exists()


def test_every_committed_model_names_only_keras_classes():
    """A committed model.keras loads in any Keras 3 without normtf (docs/how-it-works.md): its
    config names Keras's modules and no class registered by normtf."""
    import zipfile

    models = sorted((ROOT / "results").rglob("model.keras"))
    assert len(models) >= 30
    for path in models:
        config = zipfile.ZipFile(path).read("config.json").decode()
        assert not re.findall(r'"registered_name": "normtf>', config), path
        assert all(module == "keras" or module.startswith("keras.")
                   for module in re.findall(r'"module": "([\w.]+)"', config)), path


@pytest.mark.slow
@pytest.mark.parametrize("seed", [42, 43, 44])
def test_the_twenty_epoch_variance_shift_is_the_committed_batch_models(seed, dataset):
    """docs/results.md's 20-epoch line: each committed reference `batch` model's test error with its
    moving averages, with precise statistics gathered with dropout on, and with dropout off, as
    `normtf evaluate --precise-bn` measures them; and the claim that all of the gain is dropout's
    (dropout on is no better than the moving averages, dropout off is)."""
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    line = text[text.index("**At 20 epochs**"):]
    found = re.findall(r"(\d\.\d\d)%, (\d\.\d\d)%, (\d\.\d\d)%", line)[:3]
    path = ROOT / "results" / "reference" / "batch" / f"seed-{seed}" / "model.keras"
    errors = [100 * (1 - evaluate_file(path, dataset, **way).accuracy)
              for way in ({}, {"precise_bn": True, "dropout": True}, {"precise_bn": True})]
    column = [42, 43, 44].index(seed)
    assert [f"{e:.2f}" for e in errors] == [found[way][column] for way in range(3)]
    assert errors[1] >= errors[0] - 0.02 and errors[2] < errors[0] - 0.1
