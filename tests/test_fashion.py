"""--dataset fashion-mnist as a user runs it: its own runs and figures directories, its own
normalization constants recorded, its class names in the galleries, evaluation on its test set."""

import json

import pytest

from test_cli import TINY, run

from normtf import figures
from normtf.data import DATASETS


@pytest.mark.slow  # 14 s; the fast tier trains Fashion-MNIST through `sweep` and `train` below
def test_a_fashion_study_keeps_to_its_own_directories_and_names(tmp_path, monkeypatch, fashion):
    runs, img = tmp_path / "runs", tmp_path / "img"
    drawn = {}
    draw = figures.plot_misclassified
    monkeypatch.setattr(figures, "plot_misclassified",
                        lambda *args: drawn.setdefault(args[4].name, args) and draw(*args))
    result = run("compare", "--norm", "group", "--dataset", "fashion-mnist", *TINY, "--runs-dir", runs, "--img-dir", img)
    assert result.exit_code == 0, result.output

    stored = json.loads((runs / "fashion-mnist" / "group" / "config.json").read_text())
    assert stored["config"]["dataset"] == "fashion-mnist"
    assert stored["data"] == {"dataset": "fashion-mnist", "origin": "cache", "sha256": DATASETS["fashion-mnist"].files,
                              "normalization": {"mean": 0.286, "std": 0.353}}
    assert not (runs / "group").exists() and not (img / "loss_accuracy.png").exists()
    assert (img / "fashion-mnist" / "loss_accuracy.png").is_file()

    args = drawn["misclassified_group.png"]
    assert args[4].parent == img / "fashion-mnist" and "misclassified Fashion-MNIST test images" in args[5]
    assert args[6] == DATASETS["fashion-mnist"].classes  # captions name the classes (T-shirt/top, ...)
    caption = figures.misclassified_figure(*args[:4], args[5], classes=args[6]).axes[0].get_title()
    assert caption.startswith(f"true {args[6][args[1][0]]} · pred {args[6][args[2][0]]}")

    # An MNIST run of the same variant in the same --runs-dir: a directory of its own.
    assert run("train", "--norm", "group", *TINY, "--runs-dir", runs).exit_code == 0
    mnist = json.loads((runs / "group" / "config.json").read_text())
    assert mnist["data"]["dataset"] == "mnist" and mnist["data"]["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert json.loads((runs / "fashion-mnist" / "group" / "config.json").read_text()) == stored

    # evaluate takes the dataset from the run's config, and says so when told another.
    metrics = json.loads((runs / "fashion-mnist" / "group" / "metrics.json").read_text())
    result = run("evaluate", runs / "fashion-mnist" / "group", "--test-size", "500")
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"({round(metrics['final_test_accuracy'] * 500)} of 500 correct)" in text
    assert "T-shirt/top 0" in text and "Ankle boot 9" in text
    result = run("evaluate", runs / "fashion-mnist" / "group", "--test-size", "500", "--dataset", "mnist")
    assert "was trained on Fashion-MNIST; evaluating it on MNIST as you asked" in " ".join(result.output.split())

    result = run("gallery", "--dataset", "fashion-mnist", "--runs-dir", runs / "nothing", "--img-dir", img)
    assert result.exit_code == 1 and "normtf compare --all --dataset fashion-mnist" in " ".join(result.output.split())


def test_an_unknown_dataset_exits_2_and_lists_the_names():
    for command in ["data", "train", "compare", "sweep", "gallery", "evaluate", "explain"]:
        args = [command, "--dataset", "cifar10"] + (["x.keras"] if command == "evaluate" else [])
        result = run(*args)
        assert result.exit_code == 2, (command, result.output)
        assert "'mnist', 'fashion-mnist'" in " ".join(result.output.split()), command


def test_data_sweep_and_explain_take_the_dataset(tmp_path, monkeypatch, dataset, fashion):
    result = run("data", "--dataset", "fashion-mnist")
    assert result.exit_code == 0 and "Fashion-MNIST is in" in result.output and "mean 0.286, std 0.353" in result.output

    result = run("explain", "--dataset", "fashion-mnist", "--norm", "batch", "--batch-size", "8")
    assert result.exit_code == 0 and "batch: a batch of 8 Fashion-MNIST test images" in " ".join(result.output.split())

    monkeypatch.chdir(tmp_path)  # the sweep's JSON goes to <runs-dir>/<dataset>/sweep.json, its figure to <runs-dir>/img/<dataset>/
    result = run("sweep", "--dataset", "fashion-mnist", "--norm", "group", "--batch-sizes", "64", "--seeds", "1",
                 "--epochs", "1", "--train-size", "512", "--test-size", "500", "--runs-dir", "runs")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "fashion-mnist" / "sweep.json").read_text())
    assert summary["dataset"] == "fashion-mnist" and [r["norm"] for r in summary["rows"]] == ["group"]
    assert (tmp_path / "runs" / "img" / "fashion-mnist" / "batch_size_sweep.png").is_file()
    assert (tmp_path / "runs" / "batch-64" / "fashion-mnist" / "group" / "seed-42" / "model.keras").is_file()
    assert not (tmp_path / "runs" / "sweep.json").exists() and not (tmp_path / "results").exists()


def test_mnist_files_given_for_fashion_mnist_are_named_in_a_warning(tmp_path, mnist_dir):
    result = run("train", "--norm", "group", "--dataset", "fashion-mnist", "--data-dir", mnist_dir, *TINY,
                 "--runs-dir", tmp_path)
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"{mnist_dir} holds MNIST files, not Fashion-MNIST" in text
    assert "for MNIST use --dataset mnist" in text
