"""The four variants added to the study's (none, instance, batch-renorm, group-ws) through every
command that part of the study runs with them: compare, sweep, evaluate (with precise batch-norm
statistics), gallery, explain, bench; instance norm's layer against NumPy; the new layers under
XLA and mixed precision, the GPU configuration."""

import json

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from normtf.cli import app
from normtf.config import TrainConfig
from normtf.explain import explain_test_batch
from normtf.models import build_model, norm_layers
from normtf.norms import EPS, NORMS
from normtf.training import compile_model

NEW = ["none", "instance", "batch-renorm", "group-ws"]
TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "200"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_every_command_that_takes_norm_knows_the_four():
    assert set(NEW) <= set(NORMS)
    for command in ["train", "compare", "sweep", "gallery", "explain", "bench"]:
        text = " ".join(run(command, "--help").output.split())
        assert all(name in text for name in NEW), command


def test_instance_norm_is_group_norm_with_one_group_per_channel(test_batch):
    """normtf's GroupNormalization with groups=-1 against float64 NumPy: each sample's channel
    standardized over its own H, W."""
    layer = norm_layers(build_model("instance"))[0]
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 14)).astype(np.float32) * np.arange(1, 15)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(1, 2), keepdims=True), x64.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(layer(x), (x64 - mean) / np.sqrt(var + EPS), rtol=1e-4, atol=1e-5)
    assert layer.groups == 14


def test_instance_norm_before_global_pooling_makes_the_output_the_same_for_every_image(test_batch):
    """Each block-6 channel is standardized over its 6x6 positions, so its global average is beta
    whatever the image: at inference the model predicts one distribution for all (docs/how-it-works.md).
    Group norm, two groups per sample, keeps the image's say (the check can fail)."""
    for norm, same in [("instance", True), ("group", False)]:
        model = build_model(norm)
        for layer in norm_layers(model):
            layer.beta.assign(np.random.default_rng(0).normal(size=layer.beta.shape))
        out = model.predict(test_batch, verbose=0)
        assert (np.abs(out - out[0]).max() < 1e-5) == same, norm


# batch-renorm here, in a few steps; group-ws trains two epochs in that configuration in the slow tier
# (test_gpu_config.py), as every other variant does.
@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch-renorm"])
def test_the_new_layers_train_under_xla_and_mixed_precision(norm, test_batch, dataset):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_model(build_model(norm), TrainConfig(norm=norm), jit=True)
        assert model.layers[0].compute_dtype == "float16"
        labels = dataset.y_test[:32].astype("int32")
        losses = [model.train_on_batch(test_batch, labels, return_dict=True)["loss"] for _ in range(3)]
        out = model.predict(test_batch, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(losses).all() and np.isfinite(out).all()
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


def test_explain_says_what_each_new_variant_computes(dataset):
    none = explain_test_batch(TrainConfig(norm="none"), dataset, 16)
    assert [r.layer for r in none] == [f"block{i}_relu" for i in range(1, 7)]
    assert {r.statistics for r in none} == {0}  # nothing standardizes
    instance = explain_test_batch(TrainConfig(norm="instance"), dataset, 16)
    assert [r.statistics for r in instance] == [16 * c for c in (14, 28, 14, 12, 12, 12)]
    renorm = explain_test_batch(TrainConfig(norm="batch-renorm"), dataset, 16)
    assert [r.reduces_over for r in renorm] == ["N, H, W (per channel)"] * 6  # the warm-up: batch norm
    assert all(r.notes[0].startswith(f"{r.layer}: r = σ_B/σ from ") and "clipped to r = 1, d = 0" in r.notes[0]
               for r in renorm)
    ws = explain_test_batch(TrainConfig(norm="group-ws"), dataset, 16)
    assert [r.statistics for r in ws] == [32] * 6  # 16 images x 2 groups
    assert [r.notes[0].split(" over ")[0] for r in ws] == [
        f"block{i}_conv: {c} of {c} output channels' kernels at mean 0 and variance 1"
        for i, c in enumerate((14, 28, 14, 12, 12, 12), start=1)]


def test_explain_counts_a_kernel_that_is_not_standardized():
    """The count can fail: the study's plain Conv2D kernels are not standardized."""
    from normtf.explain import _standardized_kernel

    conv = build_model("group").get_layer("block2_conv")
    assert _standardized_kernel(conv)[0].startswith("block2_conv: 0 of 28 output channels")


def test_bench_refuses_the_variants_without_a_pytorch_counterpart_in_one_line():
    result = run("bench", "--norm", "group-ws", "--quick")
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "no PyTorch counterpart" in result.output and "--against keras-layers" in result.output


@pytest.mark.slow
def test_compare_evaluate_and_gallery_run_the_four_end_to_end(tmp_path):
    runs, img = tmp_path / "q", tmp_path / "q" / "img"
    result = run("compare", *[a for name in NEW for a in ("--norm", name)], *TINY, "--runs-dir", runs, "--img-dir", img)
    assert result.exit_code == 0, result.output
    assert {p.name for p in img.glob("*.png")} == {"loss_accuracy.png", *(f"misclassified_{n}.png" for n in NEW)}
    for norm in NEW:  # each file re-evaluates to the accuracy its run stored (the same 200 test images)
        plain = run("evaluate", runs / norm, "--test-size", "200")
        stored = json.loads((runs / norm / "metrics.json").read_text())["final_test_accuracy"]
        assert plain.exit_code == 0 and f"accuracy {100 * stored:.2f}%" in " ".join(plain.output.split()), plain.output
    precise = run("evaluate", runs / "batch-renorm", "--precise-bn", "--test-size", "200")
    assert precise.exit_code == 0 and "with precise batch-norm statistics, dropout on" in precise.output, precise.output
    gallery = run("gallery", *[a for name in NEW for a in ("--norm", name)], "--runs-dir", runs,
                  "--img-dir", tmp_path / "g")
    assert gallery.exit_code == 0 and len(list((tmp_path / "g").glob("misclassified_*.png"))) == 4


@pytest.mark.slow
def test_sweep_runs_batch_renorm_and_group_ws(tmp_path):
    out = tmp_path / "sweep.json"
    result = run("sweep", "--norm", "batch-renorm", "--norm", "group-ws", "--batch-sizes", "8,32", *TINY,
                 "--seeds", "1", "--runs-dir", tmp_path / "runs", "--out", out, "--img-dir", tmp_path / "img")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["norm"], r["batch_size"], r["status"]) for r in rows) == [
        ("batch-renorm", 8, "finished"), ("batch-renorm", 32, "finished"),
        ("group-ws", 8, "finished"), ("group-ws", 32, "finished")]
    assert (tmp_path / "img" / "batch_size_sweep.png").exists()


@pytest.mark.slow
def test_bench_times_a_new_variant_against_the_keras_layer_build(tmp_path, monkeypatch):
    """docs/speed.md: the variants without a PyTorch counterpart are timed with --against keras-layers."""
    monkeypatch.chdir(tmp_path)
    result = run("bench", "--quick", "--norm", "batch-renorm", "--against", "keras-layers", "--repeats", "1",
                 "--steps", "2", "--no-epoch")
    assert result.exit_code == 0, result.output
    variant = json.loads((tmp_path / "runs" / "bench-keras-layers.json").read_text())["variants"]["batch-renorm"]
    assert variant["normtf"]["images_per_second"] > 0 and variant["reference"]["images_per_second"] > 0
