"""The `normtf` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, not ours

import typer  # noqa: E402

from normtf import config as defaults  # noqa: E402
from normtf.config import RECIPES, TrainConfig  # noqa: E402
from normtf.errors import Interrupted, NormtfError, UsageError  # noqa: E402
from normtf.norms import NORMS  # noqa: E402

app = typer.Typer(help="normtf: batch, layer and group normalization on an MNIST CNN, measured and drawn.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
NormName = enum.Enum("NormName", {name: name for name in NORMS}, type=str)
DEFAULTS = TrainConfig()


def friendly(command):
    """A user's mistake or an interruption ends in one clear line and an exit code, not a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from normtf.console import err_console

        def fail(message: str, code: int):
            err_console.print(message, highlight=False, soft_wrap=True)
            raise typer.Exit(code)

        try:
            return command(*args, **kwargs)
        except Interrupted as e:
            fail(f"[yellow]{e}[/]", 130)
        except KeyboardInterrupt:
            fail("[yellow]interrupted[/]; finished runs and epochs are kept", 130)
        except NormtfError as e:
            fail(f"[red]error:[/] {e}", 2 if isinstance(e, UsageError) else 1)
        except OSError as e:  # a full disk, a read-only directory: say which file, keep it short
            fail(f"[red]error:[/] {e.strerror or e} ({e.filename or 'no file name'}); nothing finished was lost", 1)
    return wrapper


NORM_HELP = "; ".join(f"{name}: {spec.description}" for name, spec in NORMS.items())
Norms = Annotated[Optional[list[NormName]], typer.Option("--norm", help=f"Variant (repeat for several). {NORM_HELP}.")]
RunsDir = Annotated[Path, typer.Option(help="Where runs are stored: <runs-dir>/<norm>/.")]
ImgDir = Annotated[Path, typer.Option(help="Where figures are written.")]
DataDir = Annotated[Optional[Path], typer.Option(
    help="A directory with the four MNIST IDX files (raw or .gz). Default: the cache, else download.")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Training batch size.")]
Lr = Annotated[float, typer.Option(help="SGD learning rate.")]
Schedule = Annotated[str, typer.Option(help="Learning rate schedule: constant, or one-cycle (warm-up to --lr, "
                                            "cosine down to zero).")]
Recipe = Annotated[str, typer.Option(help="Starting settings: " + "; ".join(
    f"{name}: {', '.join(f'{k} {v}' for k, v in values.items()) or 'the study (lr 0.01 constant, 20 epochs)'}"
    for name, values in RECIPES.items()) + ". Flags given override them.")]
Momentum = Annotated[float, typer.Option(help="SGD momentum.")]
Dropout = Annotated[float, typer.Option(help="Dropout rate after every norm layer, in [0, 1).")]
L1 = Annotated[float, typer.Option("--l1", help="L1 penalty on conv kernels (batch-l1 only).")]
Groups = Annotated[int, typer.Option(help="Groups for group norm; must divide every block's channel count.")]
Rotation = Annotated[float, typer.Option(help="Random rotation of training images, +- degrees.")]
Seed = Annotated[int, typer.Option(help="One seed for Python, NumPy and TensorFlow.")]
TrainSize = Annotated[Optional[int], typer.Option(help="Train on a seeded class-stratified subset of N images.")]
TestSize = Annotated[Optional[int], typer.Option(help="Test on a seeded class-stratified subset of N images.")]
Precision = Annotated[str, typer.Option(
    help="auto (mixed_float16 on a GPU, float32 on CPU), float32, mixed_float16 or mixed_bfloat16.")]
Jit = Annotated[str, typer.Option(help="XLA compilation: auto (on for GPU, off for CPU), on or off.")]
Deterministic = Annotated[bool, typer.Option(
    "--deterministic", help="TensorFlow op determinism: bit-identical reruns and resumes, somewhat slower.")]
Strategy = Annotated[str, typer.Option(
    help="default (one device), mirrored (all local GPUs) or multi-worker (machines named by TF_CONFIG); "
         "the batch is split over the replicas.")]
SyncBn = Annotated[bool, typer.Option("--sync-bn", help="Batch norm statistics over the global batch of all replicas.")]
Seeds = Annotated[Optional[str], typer.Option(
    help="Several seeds, one run each under <runs-dir>/<norm>/seed-<s>/: a list (42,43,44) or a count (3: "
         "--seed and the next two).")]
Force = Annotated[bool, typer.Option("--force", help="Retrain even if a finished run with these settings exists.")]
Tensorboard = Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard logs (tensorboard --logdir runs/).")]


MAX_SEED_COUNT = 10


def _seeds(text: str | None, first: int) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds takes a count or seeds separated by commas (got {text!r})") from None
    if len(values) == 1 and "," not in text:
        count = values[0]
        if count < 1:
            raise UsageError(f"--seeds must be at least 1 (got {count})")
        if count > MAX_SEED_COUNT:  # most likely a seed typed where a count goes: hours of training
            raise UsageError(f"--seeds {count} is a count: {count} full runs. For seed {count} alone use --seed "
                             f"{count}; for more than {MAX_SEED_COUNT} seeds list them (--seeds {first},{first + 1},...)")
        return list(range(first, first + count))
    return list(dict.fromkeys(values))


def _progress(with_seed: bool):
    from normtf.console import EpochProgress

    return lambda c: [EpochProgress(f"{c.norm} seed {c.seed}" if with_seed else c.norm)]


def _writable(directory: Path) -> Path:
    """Fail now, not after an hour of training, if figures cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".normtf-write-test").touch()
        (directory / ".normtf-write-test").unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {directory}: {e.strerror}; choose another --img-dir") from None
    return directory


def _config(ctx: typer.Context, parameters: dict, **overrides) -> TrainConfig:
    """The TrainConfig of a command whose parameters carry the dataclass's field names: the
    recipe's values, except where a flag was given on the command line."""
    name = parameters.get("recipe", "reference")
    base = defaults.recipe(name)
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in parameters.items()
             if k in fields and (k not in defaults.RECIPES[name] or ctx.get_parameter_source(k).name != "DEFAULT")}
    return base.replace(**{**given, **overrides}).validate()


@app.command()
@friendly
def data(data_dir: DataDir = None):
    """Make MNIST available (verified by SHA-256) and print where it is."""
    from normtf.console import console, warn
    from normtf.data import load_mnist

    mnist = load_mnist(data_dir, warn=warn)
    console.print(f"MNIST is in {mnist.source}: {len(mnist.y_train):,} training and "
                  f"{len(mnist.y_test):,} test images")


@app.command()
@friendly
def train(ctx: typer.Context,
          norm: Annotated[NormName, typer.Option(help=f"Normalization variant. {NORM_HELP}.")] = NormName("batch-l1"),
          recipe: Recipe = "reference", epochs: Epochs = DEFAULTS.epochs, batch_size: BatchSize = DEFAULTS.batch_size,
          lr: Lr = DEFAULTS.lr, schedule: Schedule = DEFAULTS.schedule, momentum: Momentum = DEFAULTS.momentum,
          dropout: Dropout = DEFAULTS.dropout, l1: L1 = DEFAULTS.l1,
          groups: Groups = DEFAULTS.groups, rotation: Rotation = DEFAULTS.rotation, seed: Seed = DEFAULTS.seed,
          train_size: TrainSize = None, test_size: TestSize = None, precision: Precision = DEFAULTS.precision,
          jit: Jit = DEFAULTS.jit, deterministic: Deterministic = False,
          seeds: Seeds = None, strategy: Strategy = DEFAULTS.strategy, sync_bn: SyncBn = False, runs_dir: RunsDir = Path("runs"),
          data_dir: DataDir = None, tensorboard: Tensorboard = False, force: Force = False):
    """Train one variant into <runs-dir>/<norm>/; run it again to resume an interrupted run."""
    from normtf import study
    from normtf.console import console, results_table, warn

    config = _config(ctx, locals(), norm=norm.value)
    results = study.compare([config.norm], config, runs_dir, _seeds(seeds, seed), _progress(bool(seeds)), force,
                            data_dir, tensorboard, warn)
    for result in results:
        if result.reused:
            console.print(f"{result.run.path} already holds this finished run (use --force to retrain).")
    console.print(results_table(study.by_norm(results), title=f"normtf train {config.norm}"))
    console.print("files in " + ", ".join(str(r.run.path) for r in results))


@app.command()
@friendly
def compare(ctx: typer.Context, norm: Norms = None,
            all_: Annotated[bool, typer.Option("--all", help="All variants.")] = False,
            recipe: Recipe = "reference", epochs: Epochs = DEFAULTS.epochs, batch_size: BatchSize = DEFAULTS.batch_size,
            lr: Lr = DEFAULTS.lr, schedule: Schedule = DEFAULTS.schedule, momentum: Momentum = DEFAULTS.momentum,
            dropout: Dropout = DEFAULTS.dropout, l1: L1 = DEFAULTS.l1,
            groups: Groups = DEFAULTS.groups, rotation: Rotation = DEFAULTS.rotation, seed: Seed = DEFAULTS.seed,
            train_size: TrainSize = None, test_size: TestSize = None, precision: Precision = DEFAULTS.precision,
            jit: Jit = DEFAULTS.jit, deterministic: Deterministic = False,
            seeds: Seeds = None, strategy: Strategy = DEFAULTS.strategy, sync_bn: SyncBn = False, runs_dir: RunsDir = Path("runs"),
            img_dir: ImgDir = Path("img"), data_dir: DataDir = None, tensorboard: Tensorboard = False,
            force: Force = False):
    """Train several variants in turn (finished runs are reused), then draw their curves and mistakes."""
    from normtf import study
    from normtf.console import console, results_table, warn

    norms = list(NORMS) if all_ else [n.value for n in norm or []]
    if not norms:
        raise UsageError("name the variants with --norm (repeatable) or use --all")
    config = _config(ctx, locals(), norm=norms[0])
    _writable(img_dir)
    results = study.compare(norms, config, runs_dir, _seeds(seeds, seed), _progress(bool(seeds)), force, data_dir,
                            tensorboard, warn)
    console.print(results_table(study.by_norm(results), title="normtf compare"))
    written = [study.draw_curves(results, Path(img_dir) / "loss_accuracy.png"),
               *study.gallery(results, img_dir, data_dir=data_dir, warn=warn)]
    written = [str(path) for path in written if path]
    console.print("figures: " + ", ".join(written) if written else "no figures: no run finished")


@app.command()
@friendly
def sweep(ctx: typer.Context, norm: Norms = None,
          batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(
              map(str, defaults.SWEEP_BATCH_SIZES)),
          epochs: Epochs = defaults.SWEEP_EPOCHS, train_size: TrainSize = defaults.SWEEP_TRAIN_SIZE,
          test_size: TestSize = None, lr: Lr = DEFAULTS.lr,
          scale_lr: Annotated[bool, typer.Option(
              help=f"Scale the learning rate linearly with the batch size (--lr at batch {DEFAULTS.batch_size}).")] = True,
          seed: Seed = DEFAULTS.seed, groups: Groups = DEFAULTS.groups, runs_dir: RunsDir = Path("runs/sweep"),
          out: Annotated[Path, typer.Option(help="The sweep's table as JSON.")] = Path("results/sweep.json"),
          img_dir: ImgDir = Path("img"), data_dir: DataDir = None, force: Force = False):
    """Train each variant at each batch size on the same image budget; plot test error vs batch size."""
    from normtf import sweep as sweeps
    from normtf.console import EpochProgress, console, sweep_table, warn

    try:
        sizes = [int(size) for size in batch_sizes.split(",")]
    except ValueError:
        raise UsageError(f"--batch-sizes takes whole numbers separated by commas (got {batch_sizes!r})") from None
    norms = [n.value for n in norm] if norm else list(defaults.SWEEP_NORMS)
    _writable(img_dir)
    summary = sweeps.run_sweep(norms, sizes, _config(ctx, locals(), norm=norms[0]), scale_lr, runs_dir, out,
                               callbacks_for=lambda c: [EpochProgress(f"{c.norm} batch {c.batch_size}")],
                               force=force, data_dir=data_dir, warn=warn)
    console.print(sweep_table(summary))
    console.print(f"wrote {out} and {sweeps.draw_sweep(summary, Path(img_dir) / 'batch_size_sweep.png')}")


@app.command()
@friendly
def gallery(norm: Norms = None, count: Annotated[int, typer.Option(help="Misclassified images per variant.")] = 10,
            runs_dir: RunsDir = Path("runs"), img_dir: ImgDir = Path("img"), data_dir: DataDir = None):
    """Draw the first misclassified test images of each trained run as a grid."""
    from normtf import study
    from normtf.console import console, warn

    if count < 1:
        raise UsageError(f"--count must be at least 1 (got {count})")
    results = study.stored_results([n.value for n in norm] if norm else list(NORMS), runs_dir, warn)
    for path in study.gallery(results, img_dir, count, data_dir=data_dir, warn=warn):
        console.print(f"wrote {path}")


@app.command()
@friendly
def evaluate(path: Annotated[Path, typer.Argument(help="A model.keras file, or a run directory holding one.")],
             test_size: TestSize = None, data_dir: DataDir = None):
    """Load a saved model (safely: no code in the file is run) and measure it on the MNIST test set."""
    from normtf.console import confusion_table, console, warn
    from normtf.data import load_mnist
    from normtf.evaluation import evaluate_file

    if test_size is not None and test_size < 1:
        raise UsageError(f"--test-size must be at least 1 (got {test_size})")
    result = evaluate_file(path, load_mnist(data_dir, warn=warn), test_size)
    console.print(f"{path}: test loss {result.loss:.4f}, accuracy {100 * result.accuracy:.2f}% "
                  f"({result.correct:,} of {result.total:,} correct)")
    console.print(confusion_table(result))


@app.command()
@friendly
def explain(norm: Norms = None, batch_size: Annotated[int, typer.Option(help="Images in the probe batch.")] = 32,
            groups: Groups = DEFAULTS.groups, data_dir: DataDir = None):
    """Run each variant's norm layers on a real batch and show what they compute."""
    from normtf.console import console, explain_table, warn
    from normtf.data import load_mnist
    from normtf.explain import explain_test_batch

    if batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 to show batch statistics (got {batch_size})")
    dataset = load_mnist(data_dir, warn=warn)
    for name in [n.value for n in norm] if norm else list(NORMS):
        reports = explain_test_batch(TrainConfig(norm=name, groups=groups).validate(), dataset, batch_size)
        console.print(explain_table(name, batch_size, reports))


@app.command()
@friendly
def diagrams(img_dir: ImgDir = Path("img"), groups: Groups = DEFAULTS.groups):
    """Draw the N x C x (H,W) cube of each normalization with its shared-statistics set shaded."""
    from normtf.console import console
    from normtf.diagrams import draw_diagrams

    if groups < 1:
        raise UsageError(f"--groups must be at least 1 (got {groups})")
    for path in draw_diagrams(img_dir, groups):
        console.print(f"wrote {path}")


@app.command()
@friendly
def bench(norm: Norms = None, quick: Annotated[bool, typer.Option("--quick", help="A rough look in about two minutes: 10-step windows, one evaluation.")] = False,
          repeats: Annotated[int, typer.Option(help="Timed windows per framework, normtf and the reference by turns; the median is reported.")] = 5,
          steps: Annotated[Optional[int], typer.Option(help="Training steps per timed window.")] = None,
          reference: Annotated[bool, typer.Option(help="Also time the PyTorch reference loop (pip install 'normtf[bench]').")] = True,
          out: Annotated[Path, typer.Option(help="Where the results are written as JSON.")] = Path("results/bench.json")):
    """Training throughput of normtf against the reference PyTorch loop, memory, eval time, FLOP floor."""
    from normtf.bench import format_table, run_benchmark
    from normtf.console import console

    result = run_benchmark([n.value for n in norm] if norm else list(NORMS), repeats, quick, steps, reference, out,
                           progress=lambda message: console.print(message, highlight=False))
    console.print(format_table(result))
    console.print(f"wrote {out}")


def main():
    app()
