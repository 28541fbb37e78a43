"""The `normtf` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import dataclasses
import enum
import functools
import tempfile
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from normtf import config as defaults
from normtf.config import RECIPES, TrainConfig, check_options, parse_batch_sizes, parse_seeds
from normtf.data import DATASETS
from normtf.errors import Interrupted, NormtfError, NothingToDo, RunFailed, UsageError
from normtf.norms import NORMS
from normtf.runs import dataset_dir

app = typer.Typer(help="normtf: batch, layer and group normalization in a small CNN on MNIST or Fashion-MNIST, measured and drawn.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
NormName = enum.Enum("NormName", {name: name for name in NORMS}, type=str)
DEFAULTS = TrainConfig()

# Exit codes: documented in the README ("Exit codes"), tested in tests/test_cli.py.
EXIT_ERROR, EXIT_USAGE, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130


@app.callback()
def options(verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show TensorFlow's start-up and runtime log lines (hidden by default).")] = False,
            threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, metavar="<int>", help="CPU threads for TensorFlow (each of its two pools). Default: one per core. "
                                 "Use 1 to train several runs side by side: on 2 cores, two 1-thread runs "
                                 "trained 1.2-1.5x the images per second of one run on both cores.")] = None):
    from normtf import quiet

    quiet.verbose = verbose
    quiet.threads = threads


def friendly(tensorflow: bool = True):
    """Every value of the command checked (config.RULES) before anything else happens; then
    TensorFlow started quietly if the command needs it; a user's mistake, a failed run or an
    interruption ends in one clear line and an exit code, not a traceback."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            from rich.markup import escape

            from normtf.console import err_console

            def fail(message: str, code: int):
                err_console.print(message, highlight=False, soft_wrap=True)
                raise typer.Exit(code)

            try:
                check_options(kwargs)
                if tensorflow:
                    from normtf.quiet import start_tensorflow

                    start_tensorflow()
                return command(*args, **kwargs)
            except NothingToDo as e:
                from normtf.console import console

                console.print(escape(str(e)), highlight=False, soft_wrap=True)
            except Interrupted as e:
                fail(f"[yellow]{escape(str(e))}[/]", EXIT_INTERRUPTED)
            except KeyboardInterrupt:
                fail("[yellow]interrupted[/]; finished runs and epochs are kept", EXIT_INTERRUPTED)
            except RunFailed as e:
                fail(f"[red]failed:[/] {escape(str(e))}", EXIT_RUN_FAILED)
            except NormtfError as e:
                fail(f"[red]error:[/] {escape(str(e))}", EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR)
            except OSError as e:  # a full disk, a read-only directory: say which file, keep it short
                fail(f"[red]error:[/] {escape(str(e.strerror or e))} ({escape(str(e.filename or 'no file name'))}); "
                     "nothing finished was lost",
                     EXIT_ERROR)
        return wrapper
    return decorate


NORM_HELP = "; ".join(f"{name}: {spec.description}" for name, spec in NORMS.items())
Norms = Annotated[Optional[list[NormName]], typer.Option("--norm", help=f"Variant (repeat for several). {NORM_HELP}.")]
RunsDir = Annotated[Path, typer.Option(help="Where runs are stored: <runs-dir>/<norm>/ (<runs-dir>/<dataset>/<norm>/ "
                                                "for a dataset other than MNIST).")]
ImgDir = Annotated[Path, typer.Option(help="Where figures are written.")]
DataDir = Annotated[Optional[Path], typer.Option(
    help="A directory with the dataset's four IDX files (raw or .gz). Default: the cache, else download.")]
DatasetName = Annotated[Literal[tuple(DATASETS)], typer.Option(help=(
    "The dataset: " + ", ".join(DATASETS) + ". Runs and figures of a dataset other than MNIST go into a "
    "subdirectory of its name under --runs-dir and --img-dir."))]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Training batch size.")]
Lr = Annotated[float, typer.Option(help="SGD learning rate.")]
Schedule = Annotated[Literal[defaults.SCHEDULES], typer.Option(help=(
    "Learning rate schedule: constant, or one-cycle (warm-up to --lr, cosine down to zero)."))]
Recipe = Annotated[Literal[tuple(RECIPES)], typer.Option(help="Starting settings: " + "; ".join(
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
Precision = Annotated[Literal[defaults.PRECISIONS], typer.Option(
    help="auto (mixed_float16 on a GPU, float32 on CPU), float32, mixed_float16 or mixed_bfloat16.")]
Jit = Annotated[Literal[defaults.JIT_MODES], typer.Option(
    help="XLA compilation: auto (on for GPU, off for CPU), on or off.")]
Deterministic = Annotated[bool, typer.Option(
    "--deterministic", help="TensorFlow op determinism: bit-identical reruns and resumes (no measurable cost on CPU).")]
Strategy = Annotated[Literal[defaults.STRATEGIES], typer.Option(
    help="default (one device), mirrored (all local GPUs) or multi-worker (machines named by TF_CONFIG); "
         "the batch is split over the replicas.")]
SyncBn = Annotated[bool, typer.Option("--sync-bn", help="Batch norm statistics over the global batch of all replicas.")]
Seeds = Annotated[Optional[str], typer.Option(
    help="Several seeds, one run each under <runs-dir>/<norm>/seed-<s>/: a list (42,43,44) or a count (3: "
         "--seed and the next two).")]
StepsPerExecution = Annotated[Optional[int], typer.Option(
    help="Training steps per call into TensorFlow, rounded down to a divisor of the epoch's steps. Default: 32 on "
         "a GPU, 1 on CPU. With --jit on --precision mixed_float16 it asks for the GPU configuration on any machine.")]
Force = Annotated[bool, typer.Option("--force", help="Retrain even if a finished run with these settings exists.")]
Tensorboard = Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard logs (tensorboard --logdir runs/).")]


def _progress(with_seed: bool):
    from normtf.progress import EpochProgress

    return lambda c: [EpochProgress(f"{c.norm} seed {c.seed}" if with_seed else c.norm)]


def _writable(directory: Path) -> Path:
    """Fail now, not after an hour of training, if figures cannot be written. The probe file's
    name is this process's own: two compares started together into one --img-dir (README) once
    shared one, and the second to remove it failed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".normtf-write-test."):
            pass
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
@friendly(tensorflow=False)
def data(dataset: DatasetName = "mnist", data_dir: DataDir = None):
    """Make a dataset available and print where it is. Every file is verified by its SHA-256."""
    from normtf import data as datasets
    from normtf.console import console, warn

    images = datasets.load(dataset, data_dir, warn=warn)
    console.print(f"{images.spec.title} is in {images.source}: {len(images.y_train):,} training and "
                  f"{len(images.y_test):,} test images; normalized with mean {images.mean:g}, std {images.std:g}")


@app.command()
@friendly()
def train(ctx: typer.Context,
          norm: Annotated[NormName, typer.Option(help=f"Normalization variant. {NORM_HELP}.")] = NormName("batch-l1"),
          dataset: DatasetName = "mnist", recipe: Recipe = "reference", epochs: Epochs = DEFAULTS.epochs, batch_size: BatchSize = DEFAULTS.batch_size,
          lr: Lr = DEFAULTS.lr, schedule: Schedule = DEFAULTS.schedule, momentum: Momentum = DEFAULTS.momentum,
          dropout: Dropout = DEFAULTS.dropout, l1: L1 = DEFAULTS.l1,
          groups: Groups = DEFAULTS.groups, rotation: Rotation = DEFAULTS.rotation, seed: Seed = DEFAULTS.seed,
          train_size: TrainSize = None, test_size: TestSize = None, precision: Precision = DEFAULTS.precision,
          jit: Jit = DEFAULTS.jit, steps_per_execution: StepsPerExecution = None, deterministic: Deterministic = False,
          seeds: Seeds = None, strategy: Strategy = DEFAULTS.strategy, sync_bn: SyncBn = False, runs_dir: RunsDir = Path("runs"),
          data_dir: DataDir = None, tensorboard: Tensorboard = False, force: Force = False):
    """Train one variant. The run goes into <runs-dir>/<norm>/; run the same command again to resume it."""
    from normtf import study
    from normtf.console import console, results_table, warn

    config = _config(ctx, locals(), norm=norm.value)
    results = study.compare([config.norm], config, runs_dir, parse_seeds(seeds, seed), _progress(bool(seeds)), force,
                            data_dir, tensorboard, warn)
    for result in results:
        if result.reused:
            console.print(f"{result.run.path} already holds this finished run (use --force to retrain).")
    console.print(results_table(study.by_norm(results), title=f"normtf train {config.norm}"))
    console.print("files in " + ", ".join(str(r.run.path) for r in results))
    study.raise_if_failed(results)


@app.command()
@friendly()
def compare(ctx: typer.Context, norm: Norms = None,
            all_: Annotated[bool, typer.Option("--all", help="All variants.")] = False,
            dataset: DatasetName = "mnist", recipe: Recipe = "reference", epochs: Epochs = DEFAULTS.epochs, batch_size: BatchSize = DEFAULTS.batch_size,
            lr: Lr = DEFAULTS.lr, schedule: Schedule = DEFAULTS.schedule, momentum: Momentum = DEFAULTS.momentum,
            dropout: Dropout = DEFAULTS.dropout, l1: L1 = DEFAULTS.l1,
            groups: Groups = DEFAULTS.groups, rotation: Rotation = DEFAULTS.rotation, seed: Seed = DEFAULTS.seed,
            train_size: TrainSize = None, test_size: TestSize = None, precision: Precision = DEFAULTS.precision,
            jit: Jit = DEFAULTS.jit, steps_per_execution: StepsPerExecution = None,
            deterministic: Deterministic = False, seeds: Seeds = None, strategy: Strategy = DEFAULTS.strategy,
            sync_bn: SyncBn = False, runs_dir: RunsDir = Path("runs"),
            img_dir: ImgDir = Path("img"), data_dir: DataDir = None, tensorboard: Tensorboard = False,
            force: Force = False):
    """Train several variants, then draw them. Finished runs are reused; the figures show the curves and mistakes."""
    from normtf import study
    from normtf.console import console, results_table, warn

    norms = list(NORMS) if all_ else [n.value for n in norm or []]
    if not norms:
        raise UsageError("name the variants with --norm (repeatable) or use --all")
    config = _config(ctx, locals(), norm=norms[0])
    img_dir = _writable(dataset_dir(img_dir, dataset))
    results = study.compare(norms, config, runs_dir, parse_seeds(seeds, seed), _progress(bool(seeds)), force, data_dir,
                            tensorboard, warn)
    console.print(results_table(study.by_norm(results), title="normtf compare"))
    written = [study.draw_curves(results, Path(img_dir) / "loss_accuracy.png"),
               *study.gallery(results, img_dir, data_dir=data_dir, warn=warn)]
    written = [str(path) for path in written if path]
    console.print("figures: " + ", ".join(written) if written else "no figures: no run finished")
    study.raise_if_failed(results)


@app.command()
@friendly()
def sweep(ctx: typer.Context, norm: Norms = None, dataset: DatasetName = "mnist",
          batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(
              map(str, defaults.SWEEP_BATCH_SIZES)),
          epochs: Epochs = defaults.SWEEP_EPOCHS, train_size: TrainSize = defaults.SWEEP_TRAIN_SIZE,
          test_size: TestSize = None, lr: Lr = DEFAULTS.lr,
          scale_lr: Annotated[bool, typer.Option(
              help=f"Scale the learning rate linearly with the batch size (--lr at batch {DEFAULTS.batch_size}).")] = True,
          seed: Seed = DEFAULTS.seed, seeds: Annotated[str, typer.Option(
              help="Seeds of every point, one run each under <runs-dir>/batch-<size>/<norm>/seed-<s>/: a count (3: "
                   "--seed and the next two) or a list (42,43,44).")] = str(defaults.SWEEP_SEEDS),
          groups: Groups = DEFAULTS.groups, steps_per_execution: StepsPerExecution = None,
          runs_dir: RunsDir = Path("runs/sweep"),
          out: Annotated[Optional[Path], typer.Option(
              help="The sweep's table as JSON. Default: results/sweep.json (results/<dataset>/sweep.json).")] = None,
          img_dir: ImgDir = Path("img"), data_dir: DataDir = None, force: Force = False):
    """Test error against batch size. Each variant at each batch size and seed, on the same budget of images;
    batch norm also with precise statistics (each layer's mean and variance recomputed over the training images)."""
    from normtf import sweep as sweeps
    from normtf.console import console, sweep_table, warn
    from normtf.progress import EpochProgress

    sizes = parse_batch_sizes(batch_sizes)
    norms = [n.value for n in norm] if norm else list(defaults.SWEEP_NORMS)
    img_dir = _writable(dataset_dir(img_dir, dataset))
    out = out or dataset_dir("results", dataset) / "sweep.json"
    summary = sweeps.run_sweep(norms, sizes, _config(ctx, locals(), norm=norms[0]), scale_lr, runs_dir, out,
                               parse_seeds(seeds, seed), force=force, data_dir=data_dir, warn=warn,
                               callbacks_for=lambda c: [EpochProgress(f"{c.norm} at batch size {c.batch_size}, seed {c.seed}")])
    console.print(sweep_table(summary))
    console.print(f"wrote {out} and {sweeps.draw_sweep(summary, Path(img_dir) / 'batch_size_sweep.png')}")
    failed = [f"{row['norm']} at batch size {row['batch_size']}, seed {row['seed']}"
              for row in summary["rows"] if row["status"] != "finished"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(summary['rows'])} runs failed (non-finite loss): {', '.join(failed)}")


@app.command()
@friendly()
def gallery(norm: Norms = None, dataset: DatasetName = "mnist", count: Annotated[int, typer.Option(
                help="Misclassified images per variant (at most 500 are drawn).")] = 10,
            runs_dir: RunsDir = Path("runs"), img_dir: ImgDir = Path("img"), data_dir: DataDir = None):
    """Grids of misclassified test images. The first ones of each trained run, titled with truth and prediction."""
    from normtf import study
    from normtf.console import console, warn

    results = study.stored_results([n.value for n in norm] if norm else list(NORMS), runs_dir, dataset, warn)
    for path in study.gallery(results, dataset_dir(img_dir, dataset), count, data_dir=data_dir, warn=warn):
        console.print(f"wrote {path}")


@app.command()
@friendly()
def evaluate(path: Annotated[Path, typer.Argument(
                 metavar="PATH", help="A model.keras file, or a run directory holding one.")],
             dataset: Annotated[Optional[Literal[tuple(DATASETS)]], typer.Option(
                 help="The test set: " + ", ".join(DATASETS) + ". Default: the one the run's config.json names, "
                      "else mnist.")] = None,
             test_size: TestSize = None, precise_bn: Annotated[bool, typer.Option(
                 "--precise-bn", help="Also with precise batch-norm statistics: each batch-norm layer's mean and "
                                      "variance recomputed over the run's training images, weights frozen "
                                      "(PreciseBN), instead of the moving averages of training.")] = False,
             data_dir: DataDir = None):
    """Measure a saved model on the test set. It is loaded safely: no code in the file is run."""
    from normtf import data as datasets
    from normtf.console import confusion_table, console, warn
    from normtf.evaluation import evaluate_file, trained_on

    recorded = trained_on(path)
    if dataset and recorded and dataset != recorded:
        warn(f"{path} was trained on {DATASETS[recorded].title}; evaluating it on {DATASETS[dataset].title} as you asked")
    images = datasets.load(dataset or recorded or datasets.DEFAULT, data_dir, warn=warn)
    result = evaluate_file(path, images, test_size, warn=warn)
    console.print(f"{path}: test loss {result.loss:.4f}, accuracy {100 * result.accuracy:.2f}% "
                  f"({result.correct:,} of {result.total:,} correct)")
    if precise_bn:
        precise = evaluate_file(path, images, test_size, precise_bn=True, warn=warn)
        console.print(f"with precise batch-norm statistics: test loss {precise.loss:.4f}, accuracy "
                      f"{100 * precise.accuracy:.2f}% ({precise.correct:,} of {precise.total:,} correct)")
    console.print(confusion_table(result))


@app.command()
@friendly()
def explain(norm: Norms = None, batch_size: Annotated[int, typer.Option(
                help="Images in the probe batch: the first N test images, 2 to 10,000 (the test set).")] = 32,
            groups: Groups = DEFAULTS.groups, dataset: DatasetName = "mnist", data_dir: DataDir = None):
    """Show what each norm layer computes. Each is run on a real batch of test images and its statistics found."""
    from normtf.console import console, explain_table, warn
    from normtf import data as datasets
    from normtf.explain import explain_test_batch

    if batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 to show batch statistics (got {batch_size})")
    images = datasets.load(dataset, data_dir, warn=warn)
    if batch_size > len(images.y_test):
        raise UsageError(f"--batch-size must be at most {len(images.y_test):,}, the number of test images "
                         f"(got {batch_size:,})")
    for name in [n.value for n in norm] if norm else list(NORMS):
        reports = explain_test_batch(TrainConfig(norm=name, groups=groups).validate(), images, batch_size)
        console.print(explain_table(name, batch_size, reports, images.spec.title))


@app.command()
@friendly(tensorflow=False)
def diagrams(img_dir: ImgDir = Path("img"), groups: Annotated[int, typer.Option(
                 help="Groups in the group-norm figure, as the model takes them: a count that divides every "
                      "block's channel count (1 or 2).")] = DEFAULTS.groups):
    """Draw which activations share a mean. The N x C x (H,W) cube, shared-statistics set shaded."""
    from normtf.console import console
    from normtf.diagrams import draw_diagrams

    for path in draw_diagrams(img_dir, groups):  # --groups was checked with every option (config.RULES)
        console.print(f"wrote {path}")


@app.command()
@friendly(tensorflow=False)
def bench(norm: Norms = None, quick: Annotated[bool, typer.Option("--quick", help="A rough look in about two minutes: 10-step windows, one evaluation.")] = False,
          repeats: Annotated[int, typer.Option(help="Timed windows per framework, normtf and the reference by turns; the median is reported.")] = 5,
          steps: Annotated[Optional[int], typer.Option(help="Training steps per timed window.")] = None,
          reference: Annotated[bool, typer.Option(help="Also time what normtf is compared with (--against).")] = True,
          against: Annotated[str, typer.Option(
              help="reference: the PyTorch reference loop (pip install 'normtf[bench]'); keras-layers: the same "
                   "model built from Keras's own layers instead of normtf's faster ones; keras-Dropout, "
                   "keras-BatchNormalization, keras-GroupNormalization, keras-LayerNormalization: "
                   "Keras's layer of that class only.")] = "reference",
          out: Annotated[Optional[Path], typer.Option(help="Where the results are written as JSON (default: "
                                                        "results/bench.json; with --against keras-…, "
                                                        "results/bench-keras-….json).")] = None,
          epoch: Annotated[Optional[bool], typer.Option(
              "--epoch/--no-epoch", help="Also time two full epochs of `normtf train` per variant (default: yes, "
              "no with --quick).")] = None):
    """Training speed against the PyTorch reference. Throughput, memory, evaluation time, FLOP floor,
    and the epoch a user waits for."""
    from normtf.bench import format_table, run_benchmark
    from normtf.console import console

    out = out or Path("results/bench.json" if against == "reference" else f"results/bench-{against}.json")
    result = run_benchmark([n.value for n in norm] if norm else list(NORMS), repeats, quick, steps, reference, out,
                           progress=lambda message: console.print(message, highlight=False), epoch=epoch,
                           against=against)
    console.print(format_table(result))
    console.print(f"wrote {out}")


def main():
    app()
