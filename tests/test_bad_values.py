"""A catalogue of bad values for every command: each is refused with exit code 2 and one line, no
traceback, before anything is touched: the finished run in the same --runs-dir stays as it was
(even with --force), and no directory or lock file is left behind."""

import hashlib

import pytest
from typer.testing import CliRunner

from normtf.cli import app

SMALL = {"--epochs": "1", "--train-size": "1000", "--test-size": "500"}  # should a bad value slip through
TINY = [item for pair in SMALL.items() for item in pair]

CATALOGUE = [
    # train: numbers that must be finite and in the range the libraries accept
    ("train", "--lr", "inf"), ("train", "--lr", "nan"), ("train", "--lr", "0"), ("train", "--lr", "-0.1"),
    ("train", "--rotation", "inf"), ("train", "--rotation", "-1"), ("train", "--rotation", "181"),
    ("train", "--momentum", "1.5"), ("train", "--momentum", "inf"), ("train", "--momentum", "-0.1"),
    ("train", "--l1", "inf"), ("train", "--l1", "-1"), ("train", "--dropout", "1"), ("train", "--dropout", "nan"),
    ("train", "--seed", "-1"), ("train", "--seed", "99999999999"),
    ("train", "--seeds", "42,-1"), ("train", "--seeds", "0"), ("train", "--seeds", "4x"), ("train", "--seeds", "42"),
    ("train", "--groups", "3"), ("train", "--groups", "0"), ("train", "--groups", "99"),
    ("train", "--epochs", "0"), ("train", "--batch-size", "0"), ("train", "--train-size", "0"),
    ("train", "--test-size", "0"), ("train", "--batch-size", "2000", "--train-size", "1000"),
    ("train", "--steps-per-execution", "0"),
    # compare and sweep share the training values, and have their own
    ("compare", "--all", "--lr", "inf"), ("compare", "--norm", "group", "--seeds", "42,-1"), ("compare",),
    ("sweep", "--batch-sizes", "5000", "--train-size", "1000"), ("sweep", "--batch-sizes", "0,2"),
    ("sweep", "--batch-sizes", "2,x"), ("sweep", "--lr", "inf"), ("sweep", "--seed", "-1"),
    ("gallery", "--count", "0"), ("gallery", "--count", "100000"),
    ("evaluate", "RUN", "--test-size", "0"),
    ("explain", "--batch-size", "1"), ("explain", "--batch-size", "20000"), ("explain", "--groups", "3"),
    ("diagrams", "--groups", "3"), ("diagrams", "--groups", "99"), ("diagrams", "--groups", "0"),
    ("bench", "--repeats", "0"), ("bench", "--steps", "0"),
]
TAKES_RUNS_DIR = {"train", "compare", "sweep", "gallery"}
TAKES_FORCE = {"train", "compare", "sweep"}


def snapshot(directory):
    """Every file and directory under `directory`, with the SHA-256 of each file."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("bad-values") / "runs"
    result = CliRunner().invoke(app, ["train", "--norm", "group", *TINY, "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    return runs


@pytest.mark.parametrize("args", CATALOGUE, ids=" ".join)
def test_a_bad_value_is_one_line_and_exit_2_and_touches_nothing(args, finished_run, tmp_path):
    before = snapshot(finished_run)
    command, *rest = args
    rest = [str(finished_run / "group") if a == "RUN" else a for a in rest]
    extra = ["--runs-dir", str(finished_run)] if command in TAKES_RUNS_DIR else []
    extra += ["--force"] if command in TAKES_FORCE else []
    extra += ["--img-dir", str(tmp_path / "img")] if command in ("compare", "sweep", "diagrams") else []
    extra += ["--out", str(tmp_path / "out.json")] if command in ("sweep", "bench") else []
    extra += ["--norm", "group"] if command == "train" else []
    if command in TAKES_FORCE:
        extra += [item for flag, value in SMALL.items() if flag not in rest for item in (flag, value)]
    result = CliRunner().invoke(app, [command, *rest, *extra])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert snapshot(finished_run) == before
