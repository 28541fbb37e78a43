import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

from normtf import bench

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")


@needs_torch
@pytest.mark.parametrize("norm, params",
                         [("batch-l1", 9_910), ("batch", 9_910), ("group", 9_910), ("layer", 66_974),
                          ("layer-c", 9_910)])
def test_reference_model_has_the_study_parameter_counts(norm, params):
    import torch

    from normtf import torch_reference

    model = torch_reference.build(norm)  # asserts the count itself
    assert sum(p.numel() for p in model.parameters()) == params
    log_probs = model(torch_reference.rotate(torch.rand(4, 1, 28, 28), 8.0))
    assert log_probs.shape == (4, 10)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(4), atol=1e-5)


@needs_torch
def test_the_reference_knows_every_variant():
    from normtf import torch_reference
    from normtf.norms import NORMS

    assert set(torch_reference.NORMS) == {n for n, spec in NORMS.items() if spec.pytorch} == set(torch_reference.PARAMS)


def test_training_flops_match_the_issue():
    from normtf.models import build_model

    assert bench.flops_per_image(build_model("batch")) == pytest.approx(15.9e6, rel=0.1)


@pytest.mark.slow
def test_normtf_worker_measures_a_positive_throughput():
    result = bench.measure_normtf("batch", steps=3, warmup=1, repeats=1, evals=1)
    assert len(result["images_per_second"]) == 1 and result["images_per_second"][0] > 0
    assert result["eval_seconds"][0] > 0


@pytest.mark.slow  # 22 s; the fast tier times normtf's own worker, above
def test_keras_layers_worker_times_the_model_built_from_keras_layers(monkeypatch):
    import keras

    from normtf import model_files as layers

    built = []
    original = layers.with_keras_layers
    monkeypatch.setattr(layers, "with_keras_layers", lambda model, names: built.append(original(model, names)) or built[-1])
    result = bench.measure_normtf("group", steps=3, warmup=1, repeats=1, evals=1, keras_layers=True)
    assert result["images_per_second"][0] > 0 and result["eval_seconds"][0] > 0
    kinds = {type(layer) for layer in built[0].layers}
    assert keras.layers.GroupNormalization in kinds and keras.layers.Dropout in kinds
    assert not any(cls.__module__.startswith("normtf") for cls in kinds)


def test_keras_layers_of_one_class_replace_only_that_class():
    import keras

    from normtf import model_files as layers
    from normtf.models import build_model

    assert bench._keras_layers("keras-Dropout") == ["Dropout"] and bench._keras_layers("keras-layers") is True
    kinds = {type(layer) for layer in layers.with_keras_layers(build_model("group"), ["Dropout"]).layers}
    assert keras.layers.Dropout in kinds and layers.GroupNormalization in kinds
    assert layers.Dropout not in kinds


def test_every_layer_of_ours_can_be_timed_against_keras_alone():
    from normtf import model_files as layers

    assert {name.removeprefix("keras-") for name in bench.AGAINST if name.startswith("keras-")} == {
        "layers", *layers.OURS}


@pytest.mark.slow  # each worker's measurement is tested above, in this process (Keras's, in the slow tier)
@pytest.mark.parametrize("against, what", [("keras-layers", "layers"), ("keras-Dropout", "Dropout")])
def test_bench_against_keras_runs_as_the_readme_says(against, what, tmp_path, monkeypatch):
    """`normtf bench --against keras-layers` (README) and `--against keras-Dropout` through the
    command line, as a user types them (with fewer steps): both workers run by turns, the table is
    printed, and the results go to runs/bench-<against>.json, never over bench.json (the PyTorch
    comparison), and never into the committed results/."""
    from typer.testing import CliRunner

    import normtf
    from normtf.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--quick", "--norm", "layer-c", "--against", against,
                                      "--repeats", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "bench.json").exists() and not (tmp_path / "results").exists()
    stored = json.loads((tmp_path / "runs" / f"bench-{against}.json").read_text())
    assert stored["settings"]["against"] == against and stored["settings"]["train_epochs"] == 0
    assert stored["normtf"]["version"] == normtf.__version__  # which code was measured
    variant = stored["variants"]["layer-c"]
    assert variant["ratio"] > 0 and variant["reference"]["images_per_second"] > 0
    assert variant["normtf"]["eval_seconds"] > 0 and variant["reference"]["eval_seconds"] > 0
    output = " ".join(result.output.split())
    assert f"with Keras's {what}" in output and f"wrote runs/bench-{against}.json" in output


def test_bench_without_pytorch_says_how_to_install_it_and_writes_nothing(tmp_path, monkeypatch):
    """`normtf bench --quick` (README) where PyTorch is not installed, as in CI: one line with the
    install command, exit 1, no results file, before any worker starts."""
    from typer.testing import CliRunner

    from normtf.cli import app

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "torch" else find_spec(name, *args))
    monkeypatch.setattr(bench, "_Worker", lambda *args, **kwargs: pytest.fail("a worker was started"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--quick"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "pip install -e '.[bench]'" in " ".join(result.output.split())
    assert not (tmp_path / "results").exists()


def test_an_unknown_comparison_is_a_usage_error_naming_the_choices():
    with pytest.raises(bench.UsageError, match="keras-layers, keras-Dropout, keras-BatchNormalization"):
        bench.run_benchmark(["group"], against="keras-conv", out=None)


def test_table_renders_without_reference():
    variant = {"normtf": {"images_per_second": 1500.0, "peak_rss_mib": 900.0, "eval_seconds": 1.2},
               "reference": None, "ratio": None, "epoch_seconds": 40.0, "floor_epoch_seconds": 2.0,
               "epoch_vs_floor": 20.0}
    result = {"settings": {"repeats": 3, "steps": 20, "warmup": 10, "batch_size": 128},
              "machine": {"cpu_count": 2, "matmul_gflops": 480.0}, "variants": {"batch": variant}}
    assert bench.format_table(result).row_count == 1


@pytest.mark.slow  # a normtf train process: 13 s
def test_train_epochs_are_the_epoch_times_normtf_train_records():
    seconds = bench.train_epochs("group", epochs=2, options=("--train-size", "512", "--test-size", "500"))
    assert len(seconds) == 2 and all(0 < s < 600 for s in seconds)


def test_a_failing_train_epoch_says_which_command_failed():
    with pytest.raises(bench.NormtfError, match="train --norm no-such-norm .* failed"):
        bench.train_epochs("no-such-norm", epochs=1)


def test_table_shows_the_train_epoch_against_the_floor():
    variant = {"normtf": {"images_per_second": 3000.0, "peak_rss_mib": 900.0, "eval_seconds": 0.6},
               "reference": None, "ratio": None, "epoch_seconds": 20.0, "floor_epoch_seconds": 4.0,
               "epoch_vs_floor": 5.0, "train": bench._summarize_epochs([30.0, 22.0], 4.0)}
    result = {"settings": {"repeats": 3, "steps": 20, "warmup": 10, "batch_size": 128, "train_epochs": 2},
              "machine": {"cpu_count": 2, "matmul_gflops": 480.0}, "variants": {"group": variant}}
    table = bench.format_table(result)
    assert list(table.columns[-1].cells) == ["22 s 5.5x"] and list(table.columns[-2].cells) == ["20 s 5.0x"]
    assert variant["train"]["epoch_seconds_all"] == [30.0, 22.0]


def test_the_committed_benchmarks_tables_fit_80_columns_uncut():
    from rich.console import Console

    for path in sorted((Path(__file__).parent.parent / "results").glob("bench*.json")):
        result = json.loads(path.read_text())
        for variant in result["variants"].values():  # the widest cells: every column filled
            variant.setdefault("train", bench._summarize_epochs([130.0, 122.0], variant["floor_epoch_seconds"]))
        console = Console(width=80, record=True, file=io.StringIO())
        console.print(bench.format_table(result))
        lines = console.export_text().splitlines()
        assert max(map(len, lines)) <= 80 and "…" not in "".join(lines), path
        assert {line.split()[0] for line in lines if line.split()} >= set(result["variants"]), path


class _Clock:
    """time.perf_counter for bench._Windows: the current step number, in seconds."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.mark.parametrize("every", [1, 3])  # steps_per_execution: Keras reports every `every` steps
def test_windows_pause_at_each_boundary_and_count_the_images_between(monkeypatch, every):
    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)
    events = []
    sizes = [128] * 40
    sizes[10] = 96  # an epoch's short last batch
    windows = bench._Windows([4, 14, 24], sizes, gate=lambda: events.append(("gate", step)),
                             done=lambda: events.append(("done", step)))
    for step in range(every - 1, 40, every):
        clock.now = float(step)
        windows(step)
    opened = [s for kind, s in events if kind == "gate"]
    closed = [s for kind, s in events if kind == "done"]
    assert [kind for kind, _ in events] == ["gate", "done", "gate", "done"]  # strictly alternating
    assert len(windows.rates) == 2 and opened[1] == closed[0]
    for (start, end), rate in zip(zip(opened, closed), windows.rates):
        assert start >= 4 and end - start >= 10 - every + 1
        assert rate == pytest.approx(sum(sizes[start + 1:end + 1]) / (end - start))
    assert windows.rates[0] < 128  # the short batch is counted as 96 images


@pytest.mark.slow
def test_a_failing_worker_reports_its_error_to_the_benchmark():
    from normtf.errors import NormtfError

    worker = bench._Worker("normtf", norm="no-such-norm", steps=1, warmup=1, repeats=1, evals=1)
    with pytest.raises(NormtfError, match="unknown norm 'no-such-norm'"):
        worker.run_window()


def test_a_crashed_worker_reports_what_it_printed_to_stderr():
    from normtf.errors import NormtfError

    with pytest.raises(NormtfError, match="failed \\(exit 1\\)(.|\\n)*KeyError: 'no-such-kind'"):
        bench._Worker("no-such-kind").result()


def test_a_result_printed_with_the_last_done_is_not_lost():
    """The PyTorch worker prints its result right after its last "done"; when both arrive in one
    read, the line after "done" must still be found (`normtf bench --quick` failed with exit 0)."""
    script = 'import sys; print("ready", flush=True); sys.stdin.readline(); sys.stdout.write("done\\n{\\"rate\\": 1}\\n")'
    worker = bench._Worker("torch", command=[sys.executable, "-c", script])
    worker.run_window()
    assert worker.result() == {"rate": 1}


def test_the_benchmark_records_which_cpu_it_ran_on():
    """The same code's speed depends on the CPU (docs/speed.md: a kernel 10% faster on one machine
    was 4x slower on another), so results name it: model name and widest vector extension."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
    if not names:
        pytest.skip("/proc/cpuinfo names no model here")
    assert bench.cpu_model().startswith(names[0])
