"""Where commands write, and that they can: what a command writes without an output flag goes
beside its runs, never over the committed study; an unwritable place is one line and exit code 1
for every command and flag, before anything is trained (docs/how-it-works.md, "Where files go")."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normtf import figures
from normtf.cli import app

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "200"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A repository holding the committed study (results/, img/, .gitignore) as the working
    directory, as a user's clone is."""
    for name in ["results", "img"]:
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "the committed study", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_commands_without_output_flags_leave_the_committed_study_alone(clone, monkeypatch):
    """The issue's toy runs from a clone: compare, gallery, diagrams, sweep and bench without
    --img-dir or --out. Each says where its files went, all of them under runs/, and git sees no
    change to a tracked file."""
    result = run("compare", "--norm", "group", *TINY)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "figures: runs/img/loss_accuracy.png, runs/img/misclassified_group.png" in text
    assert (clone / "runs" / "img" / "loss_accuracy.png").is_file()

    result = run("gallery", "--norm", "group", "--count", "3")
    assert result.exit_code == 0 and "wrote runs/img/misclassified_group.png" in result.output, result.output

    result = run("diagrams")
    assert result.exit_code == 0 and "wrote runs/img/BatchNorm.png" in result.output, result.output

    titles = []
    plot_sweep = figures.plot_sweep
    monkeypatch.setattr(figures, "plot_sweep", lambda *a, **k: titles.append(a[2]) or plot_sweep(*a, **k))
    result = run("sweep", "--norm", "group", "--batch-sizes", "64", "--seeds", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert "wrote runs/sweep/sweep.json and runs/sweep/img/batch_size_sweep.png" in " ".join(result.output.split())
    assert ": 1 epoch of 512 images (8 steps at batch 64)," in titles[0]  # not "1 epochs"

    result = run("bench", "--quick", "--no-reference", "--norm", "group", "--repeats", "1", "--steps", "2",
                 "--no-epoch")
    assert result.exit_code == 0 and "wrote runs/bench.json" in result.output, result.output

    assert git("status", "--porcelain", cwd=clone) == ""  # runs/ is ignored; nothing tracked changed


def test_reproduction_commands_name_the_committed_directories():
    """The commands that rewrite the committed study say so: every `normtf compare`, `gallery`,
    `sweep`, `diagrams` or `bench` in the README and docs/ that writes into results/ names its
    --img-dir or --out, since the defaults no longer point there."""
    commands = [line.strip() for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                for line in page.read_text().splitlines()
                if line.strip().startswith("normtf ") and "results/" in line]
    assert commands
    for command in commands:
        if command.startswith(("normtf compare", "normtf gallery", "normtf sweep")):
            assert "--img-dir" in command, command
        if command.startswith(("normtf sweep", "normtf bench")):
            assert "--out results/" in command, command


def _one_line(result, code):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1, result.output
    return lines[0]


SWEEP = ["sweep", "--norm", "group", "--batch-sizes", "64", "--seeds", "1", *TINY]
CASES = [  # a command, the output flags it takes
    (["train", "--norm", "group", *TINY], ["--runs-dir"]),
    (["compare", "--norm", "group", *TINY], ["--runs-dir", "--img-dir"]),
    (SWEEP, ["--runs-dir", "--img-dir", "--out"]),
    (["gallery", "--norm", "group", "--runs-dir", ROOT / "results" / "reference"], ["--img-dir"]),
    (["diagrams"], ["--img-dir"]),
    (["bench", "--quick", "--no-reference", "--norm", "group"], ["--out"]),
]


@pytest.mark.parametrize("command, flags, flag", [(c, fs, f) for c, fs in CASES for f in fs],
                         ids=lambda value: value if isinstance(value, str) and value.startswith("--") else None)
def test_an_unwritable_output_place_is_exit_code_1_naming_the_flag_before_any_run(command, flags, flag, tmp_path):
    """A path under a plain file cannot be made by anyone (root included): each command refuses
    it in one line naming the flag, exit code 1, and trains nothing (the sweep used to train
    every run and then fail on --out)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    good = {"--runs-dir": tmp_path / "runs", "--img-dir": tmp_path / "img", "--out": tmp_path / "out.json"}
    places = [item for f in flags for item in (f, blocker / "x" if f == flag else good[f])]
    line = _one_line(run(*command, *places), 1)
    assert f"cannot write to {blocker / 'x' if flag != '--out' else blocker}" in line, line
    assert f"choose a writable {flag}" in line
    assert not list(tmp_path.glob("runs/**/history.json"))


def test_help_says_what_each_command_takes_and_where_it_writes():
    """sweep's --help names its own layout and no flag it lacks; explain and data, which write no
    runs or figures, say nothing of moving them; the output flags name their defaults under runs/."""
    def help_of(command):  # as one line, words broken at a hyphen by the 80-column layout made whole
        return re.sub(r"(?<=\w)- ", "-", " ".join(run(command, "--help").output.split()))

    sweep = help_of("sweep")
    assert "--jit" not in sweep and "--precision" not in sweep
    assert "<runs-dir>/batch-<size>/<norm>/seed-<s>/" in sweep and "<runs-dir>/<norm>/" not in sweep.replace(
        "batch-<size>/<norm>/", "")
    assert "Default: <runs-dir>/sweep.json" in sweep and "Default: <runs-dir>/img/" in sweep
    for command in ("explain", "data"):
        assert "Runs and figures" not in help_of(command) and "--dataset" in help_of(command)
    assert "Default: <runs-dir>/img/" in help_of("compare") and "Default: <runs-dir>/img/" in help_of("gallery")
    assert "Default: runs/img/" in help_of("diagrams") and "runs/bench.json" in help_of("bench")
