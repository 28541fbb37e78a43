"""The `normtf` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from normtf import config as defaults
from normtf.config import BEST_RECIPE, RECIPE_NAMES, RECIPES, TrainConfig, check_options, parse_batch_sizes, parse_seeds
from normtf.data import DATASETS, DEFAULT as DEFAULT_DATASET
from normtf.errors import STOP_SIGNALS, Interrupted, NormtfError, NothingToDo, RunFailed, UsageError
from normtf.norms import NORMS, get_norm, sweep_defaults, tune_defaults
from normtf.outputs import RUNS, bench_file, figures_dir, report_file, sweep_file, writable

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


INTERRUPTED = "[yellow]interrupted[/]; finished runs and epochs are kept"
_in_command = False  # set while friendly() runs a command: a signal then raises KeyboardInterrupt there


def _on_signal(signum, frame):
    """Ctrl-C, SIGTERM (`kill`, a scheduler's stop) and SIGHUP (a closed terminal) end normtf the same way at
    any moment: inside a command as KeyboardInterrupt, which the command turns into one line and
    exit code 130 (training keeps its finished epochs, normtf.training); before a command starts
    or after it has finished (TensorFlow's teardown at exit takes a second or more), with the same
    line and code at once, never the signal's own 143 or a traceback from the interpreter's exit."""
    if _in_command:
        raise KeyboardInterrupt
    from normtf.console import err_console

    sys.stdout.flush()
    err_console.print(INTERRUPTED, highlight=False)
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


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

            global _in_command
            _in_command = True
            try:
                check_options(kwargs)
                if tensorflow:
                    from normtf import quiet

                    if kwargs.get("deterministic") and quiet.threads is None:
                        quiet.threads = 1  # the thread count changes the last bits: pinned, whatever --jobs
                    quiet.start_tensorflow()
                return command(*args, **kwargs)
            except NothingToDo as e:
                from normtf.console import console

                console.print(escape(str(e)), highlight=False, soft_wrap=True)
            except Interrupted as e:
                fail(f"[yellow]{escape(str(e))}[/]", EXIT_INTERRUPTED)
            except KeyboardInterrupt:
                fail(INTERRUPTED, EXIT_INTERRUPTED)
            except RunFailed as e:
                fail(f"[red]failed:[/] {escape(str(e))}", EXIT_RUN_FAILED)
            except NormtfError as e:
                fail(f"[red]error:[/] {escape(str(e))}", EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR)
            except OSError as e:  # a full disk, a read-only directory: say which file, keep it short
                fail(f"[red]error:[/] {escape(str(e.strerror or e))} ({escape(str(e.filename or 'no file name'))}); "
                     "nothing finished was lost",
                     EXIT_ERROR)
            finally:
                _in_command = False
        return wrapper
    return decorate


NORM_HELP = "; ".join(f"{name}: {spec.description}" for name, spec in NORMS.items())
Norms = Annotated[Optional[list[NormName]], typer.Option("--norm", help=f"Variant (repeat for several). {NORM_HELP}.")]
SweepNorms = Annotated[Optional[list[NormName]], typer.Option(
    "--norm", help=f"Variant (repeat for several). Default: {', '.join(sweep_defaults())}. {NORM_HELP}.")]
RunsDir = Annotated[Path, typer.Option(help="Where runs are stored: <runs-dir>/<norm>/ (<runs-dir>/<dataset>/<norm>/ "
                                                "for a dataset other than MNIST).")]
ImgDir = Annotated[Optional[Path], typer.Option(
    help="Where figures are written. Default: <runs-dir>/img/ (<runs-dir>/img/<dataset>/ for a dataset other than "
         "MNIST); name img/ only to redraw the committed figures.", show_default=False)]
DataDir = Annotated[Optional[Path], typer.Option(
    help="A directory with the dataset's four IDX files (raw or .gz). Default: the cache, else download.")]
DATASET_HELP = "The dataset: " + ", ".join(DATASETS) + "."
ValidationSplit = Annotated[Optional[int], typer.Option(
    "--validation", help="Hold out N training images (stratified by class, always the same ones, as normtf tune "
                         "does) and measure the run on them after each epoch instead of the test set.")]
DatasetName = Annotated[Literal[tuple(DATASETS)], typer.Option(help=(
    DATASET_HELP + " Runs and figures of a dataset other than MNIST go into a subdirectory of its name under "
    "--runs-dir and --img-dir."))]
TestSetName = Annotated[Literal[tuple(DATASETS)], typer.Option("--dataset", help=DATASET_HELP)]  # commands that write no runs
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Training batch size.")]
Lr = Annotated[float, typer.Option(help="SGD learning rate.")]
Schedule = Annotated[Literal[defaults.SCHEDULES], typer.Option(help=(
    "Learning rate schedule: constant, or one-cycle (warm-up to --lr, cosine down to zero)."))]
Recipe = Annotated[Literal[RECIPE_NAMES], typer.Option(help="Starting settings: " + "; ".join(
    f"{name}: {', '.join(f'{k} {v}' for k, v in values.items()) or 'the study (lr 0.01 constant, 20 epochs)'}"
    for name, values in RECIPES.items()) + f"; {BEST_RECIPE}: each variant's own, the best trial of its tuning in "
    "--tune-dir (normtf tune). Flags given override them.")]
TuneDir = Annotated[Path, typer.Option(help=f"With --recipe {BEST_RECIPE}: the --runs-dir of the normtf tune whose "
                                            "best trials give the variants their recipes.")]
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
    "--deterministic", help="TensorFlow op determinism and one thread per run (unless 'normtf --threads'): "
                            "bit-identical reruns and resumes, whatever --jobs and the machine's core count.")]
Strategy = Annotated[Literal[defaults.STRATEGIES], typer.Option(
    help="default (one device), mirrored (all local GPUs) or multi-worker (machines named by TF_CONFIG); "
         "the batch is split over the replicas.")]
SyncBn = Annotated[bool, typer.Option("--sync-bn", help="Batch norm statistics over the global batch of all replicas.")]
Seeds = Annotated[Optional[str], typer.Option(
    help="Several seeds, one run each under <runs-dir>/<norm>/seed-<s>/: a list (42,43,44) or a count (3: "
         "--seed and the next two).")]
STEPS_HELP = ("Training steps per call into TensorFlow, rounded down to a divisor of the epoch's steps. Default: 32 "
              "on a GPU, 1 on CPU.")
StepsPerExecution = Annotated[Optional[int], typer.Option(help=(
    STEPS_HELP + " With --jit on --precision mixed_float16 it asks for the GPU configuration on any machine."))]
SweepStepsPerExecution = Annotated[Optional[int], typer.Option("--steps-per-execution", help=STEPS_HELP)]
SweepRunsDir = Annotated[Path, typer.Option("--runs-dir", help=(
    "Where the sweep's runs are stored: <runs-dir>/batch-<size>/<norm>/seed-<s>/ (<runs-dir>/batch-<size>/<dataset>/"
    "<norm>/seed-<s>/ for a dataset other than MNIST); its JSON and figure go there too unless --out and --img-dir "
    "name other places."))]
Force = Annotated[bool, typer.Option("--force", help="Retrain even if a finished run with these settings exists.")]
Tensorboard = Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard logs (tensorboard --logdir runs/).")]
Jobs = Annotated[str, typer.Option(
    metavar="auto|N", help="Runs trained at once, each in its own process with its share of the cores (cores / N "
                           "threads). auto: one per core (per 'normtf --threads' cores; a container's CPU quota counts), "
                           "at most the runs left, the available memory (1.5 GiB a job; a container's limit counts) and "
                           "4 per GPU allow; 1: one after another in this process.")]
Cluster = Annotated[Optional[str], typer.Option(
    metavar="ADDRESS", help="Train the runs as tasks on a Ray cluster (pip install 'normtf[ray]'): its address as "
                            "ray.init takes it (auto on a node of the cluster, ray://host:10001), or local for a "
                            "throwaway Ray on this machine. Finished runs come back to --runs-dir.")]


def _grid(ctx: typer.Context, jobs: str, cluster: str | None, config: TrainConfig) -> dict:
    """--jobs and --cluster as study.compare and sweep.run_sweep take them. A run spread over several
    devices (--strategy) is one job at a time; asking for more is refused."""
    from normtf.grid import parse_jobs

    count = parse_jobs(jobs)
    if config.strategy != "default":
        if (count or 1) > 1 or cluster is not None:
            raise UsageError(f"--strategy {config.strategy} spreads one run over several devices; --jobs and "
                             "--cluster train several runs side by side: use one or the other")
        count = 1
    return {"jobs": count, "cluster": cluster}


def _config(ctx: typer.Context, parameters: dict, best: dict | None = None, **overrides) -> TrainConfig:
    """The TrainConfig of a command whose parameters carry the dataclass's field names: the
    recipe's values (`best`: the variant's best recipe's), except where a flag was given on the command line."""
    name = parameters.get("recipe", "reference")
    values = best if name == BEST_RECIPE else RECIPES[name]
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in parameters.items()
             if k in fields and (k not in values or ctx.get_parameter_source(k).name != "DEFAULT")}
    return defaults.recipe(name, values).replace(**{**given, **overrides}).validate()


def _best_recipes(recipe: str, tune_dir: Path, norms: list[str], dataset: str) -> dict[str, dict]:
    """--recipe best: each variant's best recipe in the tuning in --tune-dir, each said in a line; else
    no recipe of a variant's own."""
    if recipe != BEST_RECIPE:
        return {}
    from normtf.console import console, warn
    from normtf.tune import best_recipes, recipe_text

    best = best_recipes(tune_dir, norms, dataset, warn)
    for norm, trial in best.items():
        console.print(f"{norm}: the recipe of trial {trial['number']} in {tune_dir}, the best of its "
                      f"{trial['finished']} finished (validation accuracy {100 * trial['validation_accuracy']:.2f}%): "
                      f"{recipe_text(trial['params'])}", highlight=False, soft_wrap=True)
    return {norm: trial["params"] for norm, trial in best.items()}


@app.command()
@friendly(tensorflow=False)
def data(dataset: TestSetName = "mnist", data_dir: DataDir = None):
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
          train_size: TrainSize = None, test_size: TestSize = None, validation: ValidationSplit = None,
          precision: Precision = DEFAULTS.precision,
          jit: Jit = DEFAULTS.jit, steps_per_execution: StepsPerExecution = None, deterministic: Deterministic = False,
          seeds: Seeds = None, strategy: Strategy = DEFAULTS.strategy, sync_bn: SyncBn = False, runs_dir: RunsDir = Path("runs"),
          data_dir: DataDir = None, tensorboard: Tensorboard = False, force: Force = False, jobs: Jobs = "auto",
          cluster: Cluster = None, tune_dir: TuneDir = Path("runs/tune")):
    """Train one variant. The run goes into <runs-dir>/<norm>/; run the same command again to resume it."""
    from normtf import study
    from normtf.console import console, results_table, warn

    parameters = locals()
    best = _best_recipes(recipe, tune_dir, [norm.value], dataset)
    config = _config(ctx, parameters, best.get(norm.value), norm=norm.value)
    writable(runs_dir, "--runs-dir")
    results = study.compare([config.norm], config, runs_dir, parse_seeds(seeds, seed), force=force, data_dir=data_dir,
                            tensorboard=tensorboard, warn=warn, show=True, **_grid(ctx, jobs, cluster, config))
    for result in results:
        if result.reused:
            console.print(f"{result.run.path} already holds this finished run (use --force to retrain).")
    console.print(results_table(study.by_norm(results), title=f"normtf train {config.norm}"))
    console.print("files in " + ", ".join(str(r.run.path) for r in results))
    study.raise_if_failed(results)


@app.command()
@friendly()
def compare(ctx: typer.Context, norm: Norms = None,
            all_: Annotated[bool, typer.Option("--all", help=f"All {len(NORMS)} variants: {', '.join(NORMS)}.")] = False,
            dataset: DatasetName = "mnist", recipe: Recipe = "reference", epochs: Epochs = DEFAULTS.epochs, batch_size: BatchSize = DEFAULTS.batch_size,
            lr: Lr = DEFAULTS.lr, schedule: Schedule = DEFAULTS.schedule, momentum: Momentum = DEFAULTS.momentum,
            dropout: Dropout = DEFAULTS.dropout, l1: L1 = DEFAULTS.l1,
            groups: Groups = DEFAULTS.groups, rotation: Rotation = DEFAULTS.rotation, seed: Seed = DEFAULTS.seed,
            train_size: TrainSize = None, test_size: TestSize = None, precision: Precision = DEFAULTS.precision,
            jit: Jit = DEFAULTS.jit, steps_per_execution: StepsPerExecution = None,
            deterministic: Deterministic = False, seeds: Seeds = None, strategy: Strategy = DEFAULTS.strategy,
            sync_bn: SyncBn = False, runs_dir: RunsDir = Path("runs"),
            img_dir: ImgDir = None, data_dir: DataDir = None, tensorboard: Tensorboard = False,
            force: Force = False, jobs: Jobs = "auto", cluster: Cluster = None, tune_dir: TuneDir = Path("runs/tune")):
    """Train several variants, then draw them. Finished runs are reused; the figures show the curves and mistakes."""
    from normtf import study
    from normtf.console import console, results_table, warn

    parameters = locals()
    norms = list(NORMS) if all_ else [n.value for n in norm or []]
    if not norms:
        raise UsageError("name the variants with --norm (repeatable) or use --all")
    best = _best_recipes(recipe, tune_dir, norms, dataset)
    configs = {name: _config(ctx, parameters, best.get(name), norm=name) for name in norms}
    config = configs[norms[0]]
    writable(runs_dir, "--runs-dir")
    img_dir = writable(figures_dir(img_dir, runs_dir, dataset), "--img-dir")
    results = study.compare(norms, configs if best else config, runs_dir, parse_seeds(seeds, seed), force=force,
                            data_dir=data_dir, tensorboard=tensorboard, warn=warn, show=True, img_dir=img_dir,
                            **_grid(ctx, jobs, cluster, config))
    console.print(results_table(study.by_norm(results), title="normtf compare"))
    written = [study.draw_curves(results, Path(img_dir) / "loss_accuracy.png"),
               *study.gallery(results, img_dir, data_dir=data_dir, warn=warn)]
    written = [str(path) for path in written if path]
    console.print("figures: " + ", ".join(written) if written else "no figures: no run finished")
    study.raise_if_failed(results)


@app.command()
@friendly()
def sweep(ctx: typer.Context, norm: SweepNorms = None, dataset: DatasetName = "mnist",
          batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(
              map(str, defaults.SWEEP_BATCH_SIZES)),
          epochs: Epochs = defaults.SWEEP_EPOCHS, train_size: TrainSize = defaults.SWEEP_TRAIN_SIZE,
          test_size: TestSize = None, lr: Lr = DEFAULTS.lr,
          scale_lr: Annotated[bool, typer.Option(
              help=f"Scale the learning rate linearly with the batch size (--lr at batch {DEFAULTS.batch_size}).")] = True,
          seed: Seed = DEFAULTS.seed, seeds: Annotated[str, typer.Option(
              help="Seeds of every point, one run each under <runs-dir>/batch-<size>/<norm>/seed-<s>/: a count (3: "
                   "--seed and the next two) or a list (42,43,44).")] = str(defaults.SWEEP_SEEDS),
          dropout: Dropout = DEFAULTS.dropout, groups: Groups = DEFAULTS.groups,
          steps_per_execution: SweepStepsPerExecution = None, runs_dir: SweepRunsDir = Path("runs/sweep"),
          out: Annotated[Optional[Path], typer.Option(
              help="The sweep's table as JSON. Default: <runs-dir>/sweep.json (<runs-dir>/<dataset>/sweep.json for "
                   "a dataset other than MNIST); name results/sweep.json only to replace the committed sweep.")] = None,
          extend: Annotated[Optional[Path], typer.Option(
              help="Add these variants to a sweep's JSON: its rows of the other variants are kept, when it measured "
                   "the same dataset, budget, recipe (--dropout, --groups), batch sizes, seeds and learning rates "
                   "(else exit 2). --out defaults to this file.")] = None,
          img_dir: ImgDir = None, data_dir: DataDir = None, force: Force = False, jobs: Jobs = "auto",
          cluster: Cluster = None):
    """Test error against batch size. Each variant at each batch size and seed, on the same budget of images;
    batch norm also with precise statistics (each layer's mean and variance recomputed over the training images,
    with dropout on and off)."""
    from normtf import sweep as sweeps
    from normtf.console import console, sweep_table, warn
    from normtf.files import read_json

    sizes = parse_batch_sizes(batch_sizes)
    norms = [n.value for n in norm] if norm else sweep_defaults()
    config = _config(ctx, locals(), norm=norms[0])
    writable(runs_dir, "--runs-dir")  # every place the sweep writes, before its first run
    img_dir = writable(figures_dir(img_dir, runs_dir, dataset), "--img-dir")
    previous = read_json(extend) if extend else None
    if extend and previous is None:
        raise UsageError(f"--extend {extend}: no such file; name the JSON of a sweep that has been run")
    out = sweep_file(out or extend, runs_dir, dataset)
    writable(out.parent, "--out")
    summary = sweeps.run_sweep(norms, sizes, config, scale_lr, runs_dir, out, parse_seeds(seeds, seed), force=force,
                               data_dir=data_dir, warn=warn, show=True, extend=previous,
                               **_grid(ctx, jobs, cluster, config))
    console.print(sweep_table(summary))
    console.print(f"wrote {out} and {sweeps.draw_sweep(summary, Path(img_dir) / 'batch_size_sweep.png')}")
    rows = summary["rows"]
    failed = [f"{row['norm']} at batch size {row['batch_size']}, seed {row['seed']} ({row['failure']})"
              for row in rows if row["status"] == "failed"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(rows)} runs failed: {', '.join(failed)}")
    busy = [f"{row['norm']} at batch size {row['batch_size']}, seed {row['seed']}" for row in rows if row["status"] == "busy"]
    if busy:
        raise NormtfError(f"{len(busy)} of {len(rows)} runs were being trained by another normtf process: "
                          f"{', '.join(busy)}; run the same command again once it has finished")


@app.command()
@friendly()
def tune(ctx: typer.Context,
         norm: Annotated[Optional[list[str]], typer.Option(
             "--norm", metavar="VARIANT", help=f"Variant to tune (repeat for several). Default: the {len(tune_defaults())} "
                                               f"that learn, {', '.join(tune_defaults())}. {NORM_HELP}.")] = None,
         dataset: DatasetName = "mnist",
         trials: Annotated[int, typer.Option(help="Trials per variant: recipes tried, one run each. A tuning run "
                                                  "again with more goes on from where it is.")] = defaults.TUNE_TRIALS,
         epochs: Annotated[int, typer.Option(help="Training epochs of each trial.")] = defaults.TUNE_EPOCHS,
         train_size: Annotated[Optional[int], typer.Option(
             help="Train each trial on a seeded class-stratified subset of N of the training images the validation "
                  "split leaves. Default: all of them.")] = None,
         validation: Annotated[int, typer.Option(
             help="Training images held out to measure every trial on (stratified by class, always the same ones); "
                  "the test set is not used.")] = defaults.TUNE_VALIDATION,
         seed: Annotated[int, typer.Option(help="The seed of every trial's run and of the search.")] = DEFAULTS.seed,
         deterministic: Deterministic = False,
         runs_dir: Annotated[Path, typer.Option("--runs-dir", help=(
             "Where the tuning goes: its database tune.db (an Optuna study per variant), tune.json, and the trials in "
             "trial-<n>/<norm>/ (<runs-dir>/<dataset>/tune.db and trial-<n>/<dataset>/<norm>/ for a dataset other "
             "than MNIST)."))] = Path("runs/tune"),
         img_dir: ImgDir = None, data_dir: DataDir = None, jobs: Jobs = "auto", cluster: Cluster = None):
    """Tune each variant's own recipe on a validation split. Learning rate, schedule, dropout and L1 (Optuna's
    TPE sampler), each trial a run; run the same command again to go on after a stop. Then --recipe best."""
    from normtf import tune as tuning
    from normtf.console import console, tuning_table, warn
    from normtf.job import Options

    norms = list(dict.fromkeys(norm or tune_defaults()))
    for name in norms:
        get_norm(name)  # an unknown variant: one line, like every other value
    config = _config(ctx, locals(), norm=norms[0])
    writable(runs_dir, "--runs-dir")
    img_dir = writable(figures_dir(img_dir, runs_dir, dataset), "--img-dir")
    summary, unfinished = tuning.tune(norms, config, trials, runs_dir, Options(data_dir=data_dir), show=True,
                                      warn=warn, say=lambda line: console.print(line, highlight=False, soft_wrap=True),
                                      **_grid(ctx, jobs, cluster, config))
    console.print(tuning_table(summary))
    figure = tuning.draw(summary, Path(img_dir) / tuning.FIGURE)
    console.print(f"wrote {tuning.database(runs_dir, dataset).with_name(tuning.SUMMARY)} and {figure}")
    tuning.raise_if_unfinished(unfinished)


@app.command()
@friendly()
def gallery(norm: Norms = None, dataset: DatasetName = "mnist", count: Annotated[int, typer.Option(
                help="Misclassified images per variant (at most 500 are drawn).")] = 10,
            runs_dir: RunsDir = Path("runs"), img_dir: ImgDir = None, data_dir: DataDir = None):
    """Grids of misclassified test images. The first ones of each trained run, titled with truth and prediction."""
    from normtf import study
    from normtf.console import console, warn

    results = study.stored_results([n.value for n in norm] if norm else list(NORMS), runs_dir, dataset, warn)
    img_dir = writable(figures_dir(img_dir, runs_dir, dataset), "--img-dir")
    for path in study.gallery(results, img_dir, count, data_dir=data_dir, warn=warn):
        console.print(f"wrote {path}")


@app.command()
@friendly()
def evaluate(path: Annotated[Path, typer.Argument(
                 metavar="PATH", help="A model.keras file, or a run directory holding one.")],
             dataset: Annotated[Optional[Literal[tuple(DATASETS)]], typer.Option(
                 help="The test set: " + ", ".join(DATASETS) + ". Default: the one the run's config.json names, "
                      "else mnist.")] = None,
             test_size: Annotated[Optional[int], typer.Option(
                 help="Score a seeded class-stratified subset of N test images. Default: the run's own test set "
                      "(its config.json's test_size, the subset it was tested on in training), else all.")] = None,
             precise_bn: Annotated[bool, typer.Option(
                 "--precise-bn", help="Also with precise batch-norm statistics: each batch-norm layer's mean and "
                                      "variance recomputed over the run's training images (unrotated), weights "
                                      "frozen (PreciseBN), instead of the moving averages of training; twice, with "
                                      "dropout on (as in training) and off (as at test time).")] = False,
             data_dir: DataDir = None):
    """Measure a saved model on the test set. It is loaded safely: no code in the file is run."""
    from normtf.console import confusion_table, console, warn
    from normtf.evaluation import evaluate_file, load_test_set, run_config, which_test_set

    config = run_config(path)
    recorded = config.dataset if config else None
    if dataset and recorded and dataset != recorded:
        warn(f"{path} was trained on {DATASETS[recorded].title}; evaluating it on {DATASETS[dataset].title} as you asked")
    images = load_test_set(dataset or recorded or DEFAULT_DATASET, data_dir, warn)
    own = config if config and config.dataset == images.name else None  # its test set is the run's own
    size = test_size if test_size is not None else own and own.test_size
    result = evaluate_file(path, images, size, warn=warn)
    console.print(f"test set: {which_test_set(images, size, own is not None and test_size is None)}", highlight=False)
    console.print(f"{path}{', with the moving averages of training' if precise_bn else ''}: test loss "
                  f"{result.loss:.4f}, accuracy {100 * result.accuracy:.2f}% ({result.correct:,} of {result.total:,} correct)")
    if not precise_bn:
        console.print(confusion_table(result))
        return
    measured, said = [("with the moving averages of training", result)], []
    for words in ["on, as in training", "off, as at test time"]:  # normtf.precise_bn: what each separates
        precise = evaluate_file(path, images, size, precise_bn=True, dropout=words.startswith("on"), warn=said.append)
        measured.append((f"with precise batch-norm statistics, dropout {words}", precise))
        console.print(f"{measured[-1][0]}: test loss {precise.loss:.4f}, accuracy {100 * precise.accuracy:.2f}% "
                      f"({precise.correct:,} of {precise.total:,} correct)")
    for message in dict.fromkeys(said):  # a model without batch norm is said so once
        warn(message)
    for name, each in measured:
        console.print(confusion_table(each, name))


@app.command()
@friendly()
def explain(norm: Norms = None, batch_size: Annotated[int, typer.Option(
                help="Images in the probe batch: the first N test images, 2 to 10,000 (the test set).")] = 32,
            groups: Groups = DEFAULTS.groups, dataset: TestSetName = "mnist", data_dir: DataDir = None):
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
def diagrams(img_dir: Annotated[Optional[Path], typer.Option(
                 help="Where the figures are written. Default: runs/img/; name img/ only to redraw the committed "
                      "figures.", show_default=False)] = None, groups: Annotated[int, typer.Option(
                 help="Groups in the group-norm figure, as the model takes them: a count that divides every "
                      "block's channel count (1 or 2).")] = DEFAULTS.groups):
    """Draw which activations share a mean. The N x C x (H,W) cube, shared-statistics set shaded."""
    from normtf.console import console
    from normtf.diagrams import draw_diagrams

    img_dir = writable(figures_dir(img_dir, RUNS, DEFAULT_DATASET), "--img-dir")
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
                                                        "runs/bench.json; with --against keras-…, "
                                                        "runs/bench-keras-….json); name results/bench.json "
                                                        "only to replace the committed benchmark.")] = None,
          epoch: Annotated[Optional[bool], typer.Option(
              "--epoch/--no-epoch", help="Also time two full epochs of `normtf train` per variant (default: yes, "
              "no with --quick).")] = None):
    """Training speed against the PyTorch reference. Throughput, memory, evaluation time, FLOP floor,
    and the epoch a user waits for."""
    from normtf.bench import default_norms, format_table, run_benchmark
    from normtf.console import console

    out = bench_file(out, against)
    writable(out.parent, "--out")
    result = run_benchmark([n.value for n in norm] if norm else default_norms(against, reference), repeats, quick, steps, reference, out,
                           progress=lambda message: console.print(message, highlight=False), epoch=epoch,
                           against=against)
    console.print(format_table(result))
    console.print(f"wrote {out}")


@app.command()
@friendly(tensorflow=False)  # TensorFlow starts only if there is a model to evaluate
def report(runs_dir: Annotated[Path, typer.Option(help=(
               "The directory to show: every run under it, at any depth (<dir>/<norm>/, <dir>/<norm>/seed-<s>/, "
               "<dir>/<dataset>/<norm>/...), every sweep.json; e.g. results for the committed study."))] = RUNS,
           out: Annotated[Optional[Path], typer.Option(help=(
               "The page. Default: <runs-dir>/report.html; name docs/report.html only to replace the committed "
               "page."), show_default=False)] = None,
           count: Annotated[int, typer.Option(help="Misclassified test images shown per variant.")] = 10,
           data_dir: DataDir = None):
    """One HTML page of a runs directory. Results tables, curves, misclassified images, the sweep and each run's
    provenance, from its files (it trains nothing); it opens offline, every script and image inside."""
    from normtf import report as reports
    from normtf.console import console, warn

    out = report_file(out, runs_dir)
    if out.is_dir():
        raise NormtfError(f"--out {out} is a directory; name the page's file, e.g. {out / 'report.html'}")
    writable(out.parent, "--out")
    page = reports.build(runs_dir, out, count, data_dir, warn)
    console.print(f"wrote {out} ({page.size / 1e6:.1f} MB): {sum(len(s.runs) for s in page.studies)} runs in "
                  f"{len(page.studies)} director{'ies' if len(page.studies) != 1 else 'y'}, {len(page.sweeps)} sweep{'s' if len(page.sweeps) != 1 else ''}"
                  + (f"; {len(page.problems)} could not be read whole, named in the page" if page.problems else ""),
                  highlight=False)


def main():
    """The `normtf` command (also `python -m normtf` and `python cli.py`): Ctrl-C, SIGTERM and SIGHUP
    are _on_signal's for the whole process, unless it was started ignoring them."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    _leave(code)


def _leave(code) -> None:
    """Exit with `code` now, after Python's atexit functions and with stdout and stderr flushed,
    but without the interpreter's teardown: TensorFlow's destructors take 1.5-2.5 s there (on this
    CPU), and during it Python no longer handles signals, so a SIGTERM after the last line ended
    normtf with the signal's 143 instead of 130. A multi-worker process (TF_CONFIG) leaves the
    ordinary way: its coordination service takes leave of the other workers in that teardown."""
    if os.environ.get("TF_CONFIG"):
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit's other forms: None is success, a message is printed
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (normtf ... | head), a closed stream
            pass
    os._exit(code)
