"""Each normalization at its best: search each variant's own recipe on a validation split (normtf tune).

A recipe that suits one normalization need not suit another (batch norm's gift is the larger
learning rate it allows: Bjorck et al., 2018), so each variant gets a search of its own over
config.TUNE_SPACE: the learning rate, its schedule, dropout, and the L1 strength where the variant
has L1. Each recipe tried is a trial: a run like any other, trained by the grid (side by side with
--jobs, on Ray with --cluster) into <runs-dir>/trial-<n>/<norm>/, on the training images a
validation split leaves, and measured on that split (TrainConfig.validation): the test set is never
evaluated while tuning.

The recipes come from Optuna, one study per variant with a TPE sampler, stored in one SQLite
database, <runs-dir>/tune.db, which only this process writes (ask and tell, under a lock; the
grid's processes only train). A tuning is reproducible from its seed whatever --jobs, interruptions
or how --trials grew: trials are asked in rounds of ROUND per variant; trial n is asked by a sampler
seeded from (seed, n) that sees the earlier rounds' trials with their results and the trials of its
own round before it as running, nothing else; a round's trials of every variant train in one grid
and are told in trial order. A trial asked but never told (the command was stopped) is trained again
with the recipe it was asked with, from its checkpoint: the same command goes on where it stopped,
every finished trial kept and none counted twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from normtf import data, figures, grid
from normtf.config import TUNE_SPACE, TrainConfig
from normtf.errors import NormtfError, RunFailed, UsageError
from normtf.files import write_json
from normtf.job import Options, RunSpec
from normtf.norms import VARIANT_SETTINGS, color, get_norm, relevant
from normtf.runs import dataset_dir
from normtf.training import TrainResult, preflight

ROUND = 4  # trials asked of each variant at a time; a round of every variant trains side by side
STARTUP = 8  # trials drawn at random before TPE models the results: the first two rounds
DATABASE, SUMMARY, FIGURE = "tune.db", "tune.json", "validation_accuracy_vs_lr.png"
STATES = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "diverged", TrialState.RUNNING: "asked",
          TrialState.FAIL: "failed", TrialState.WAITING: "waiting"}


def database(runs_dir: Path | str, dataset: str) -> Path:
    """<runs-dir>/tune.db (<runs-dir>/<dataset>/tune.db for a dataset other than MNIST)."""
    return dataset_dir(runs_dir, dataset) / DATABASE


def space(norm: str) -> dict:
    """The variant's search space as Optuna's distributions: TUNE_SPACE without the settings the
    variant does not use (L1 but for batch-l1). L1 comes last, so that the first, random trials of
    every variant try the same learning rates, schedules and dropouts."""
    distributions = {}
    for name, values in TUNE_SPACE.items():
        if name in VARIANT_SETTINGS and name not in get_norm(norm).uses:
            continue
        if all(isinstance(value, str) for value in values):
            distributions[name] = CategoricalDistribution(values)
        else:
            low, high, scale = values
            distributions[name] = FloatDistribution(low, high, log=scale == "log")
    return distributions


def settings(base: TrainConfig, norm: str) -> dict:
    """What a variant's study measures, as its database records it: the trials' fixed settings (the
    dataset, the budget, the seed, ...), the search space and how trials are asked. A tuning that goes
    on in that database must have the same."""
    fixed = {key: value for key, value in base.to_dict().items() if key not in TUNE_SPACE and key != "norm"}
    return json.loads(json.dumps({"fixed": fixed, "space": {name: TUNE_SPACE[name] for name in space(norm)},
                                  "round": ROUND, "startup": STARTUP, "validation_seed": data.VALIDATION_SEED}))


def differences(theirs: dict, mine: dict, same_variant: bool) -> list[str]:
    """Each setting in which a stored study (`theirs`) differs from this tuning's, as "epochs 5 there,
    3 here"; the search space only for the same variant (only batch-l1's has L1)."""
    pairs = [(key.replace("_", " "), theirs["fixed"].get(key), mine["fixed"].get(key))
             for key in dict.fromkeys([*mine["fixed"], *theirs["fixed"]])]
    if same_variant:
        pairs += [(f"search space of {name}", theirs["space"].get(name), mine["space"].get(name))
                  for name in dict.fromkeys([*mine["space"], *theirs["space"]])]
    pairs += [("trials a round", theirs.get("round"), mine["round"]),
              ("random trials first", theirs.get("startup"), mine["startup"]),
              ("validation split's seed", theirs.get("validation_seed"), mine["validation_seed"])]
    return [f"{name} {there} there, {here} here" for name, there, here in pairs if there != here]


# --- the database ------------------------------------------------------------------------------

def _quiet() -> None:
    """Optuna's log lines (a line per study created, per trial told) are not ours to print: a tuning
    prints one line per trial itself. Its experimental-feature warnings neither."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _storage(path: Path, flag: str = "--runs-dir"):
    """The database at `path` (made if missing); UsageError if it is no database Optuna can read (`flag`
    chose where it is)."""
    import sqlalchemy

    _quiet()
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
        storage.get_all_studies()
        return storage
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise UsageError(f"{path} is not a tuning database normtf can read ({reason}); move it away to start a new "
                         f"tuning, or name another {flag}") from None


@contextmanager
def _locked(path: Path):
    """Hold the database for this process alone while the block runs: a second tuning of it is refused
    in one line naming the holder. The lock file beside it goes when the lock is released."""
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the holder may remove the file between our open and our lock: open it anew
        handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UsageError(f"another normtf tune (pid {holder}) is using {path}; wait for it to finish, or tune "
                             "into another --runs-dir") from None
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    else:
        raise NormtfError(f"could not lock {path}: its lock file keeps changing; is another normtf tune running?")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: nobody can be between open and lock on it
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextmanager
def _opened(path: Path):
    """The database, locked and open; a database error later on (a full disk) is one line, exit 1: every
    finished trial is in its run directory, and the same command tells it."""
    import sqlalchemy

    with _locked(path):
        storage = _storage(path)
        try:
            yield storage
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise NormtfError(f"the tuning database {path} failed ({str(getattr(e, 'orig', None) or e).splitlines()[0]}); "
                              "finished trials are kept; run the same command again") from None
        finally:
            storage.engine.dispose()


def _studies(storage, path: Path, norms: list[str], base: TrainConfig) -> dict[str, optuna.Study]:
    """Each variant's study, made if new; UsageError naming every difference if the database holds a
    tuning of other settings (before anything is written)."""
    stored = {study.study_name: study.user_attrs.get("settings") for study in storage.get_all_studies()}
    found = []
    for norm in norms:
        mine = settings(base, norm)
        for name, theirs in stored.items():
            if theirs is not None:  # None: made by a tuning stopped before it wrote them; taken as new
                found += differences(theirs, mine, same_variant=name == norm)
    if found:
        raise UsageError(f"{path} holds a tuning of other settings ({'; '.join(dict.fromkeys(found))}); use its "
                         "flags, or tune into another --runs-dir")
    studies = {}
    for norm in norms:
        study = optuna.create_study(study_name=norm, storage=storage, direction="maximize", load_if_exists=True)
        if "settings" not in study.user_attrs:
            study.set_user_attr("settings", settings(base, norm))
        studies[norm] = study
    return studies


# --- asking and telling ---------------------------------------------------------------------------

def _sampler(seed: int, number: int) -> optuna.samplers.TPESampler:
    """Trial `number`'s own sampler: TPE, seeded from the tuning's seed and the trial's number, so that
    what it proposes depends on nothing but those and the trials it is shown. multivariate: the
    learning rate and schedule are modelled together; constant_liar: the trials of its round asked
    before it count as results worse than any, so that a round spreads out."""
    state = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=state, n_startup_trials=STARTUP, multivariate=True, constant_liar=True)


def _ask(study: optuna.Study, norm: str, number: int, seed: int) -> FrozenTrial:
    """Ask trial `number` (the study's next): its sampler is shown the trials of the earlier rounds as
    they ended and those of its own round before it as asked, in a copy of the study in memory; the
    recipe it proposes is written to the database in one step (a trial with its whole recipe, or none)."""
    trials = study.get_trials(deepcopy=False)
    start = number - number % ROUND
    if len(trials) != number or any(t.state == TrialState.RUNNING for t in trials[:start]):
        raise RuntimeError(f"{norm}: trial {number} asked out of turn")  # a bug: rounds are told whole
    mirror = optuna.create_study(direction="maximize", sampler=_sampler(seed, number))
    mirror.add_trials([*trials[:start], *(create_trial(state=TrialState.RUNNING, params=t.params,
                                                       distributions=t.distributions) for t in trials[start:])])
    distributions = space(norm)
    study.add_trial(create_trial(state=TrialState.RUNNING, params=mirror.ask(distributions).params,
                                 distributions=distributions))
    return study.get_trials(deepcopy=False)[number]


def _round(study: optuna.Study, norm: str, seed: int, trials: int) -> list[FrozenTrial]:
    """The variant's trials to train now: those asked and never told, and the rest of their round (or
    the next round) asked now, up to `trials` in all."""
    existing = study.get_trials(deepcopy=False)
    asked = [t for t in existing if t.state == TrialState.RUNNING]
    number = len(existing)
    if number < trials and (not asked or number % ROUND):  # a round asked whole is trained first
        asked += [_ask(study, norm, n, seed) for n in range(number, min(trials, number - number % ROUND + ROUND))]
    return asked


def trial_config(base: TrainConfig, norm: str, params: dict) -> TrainConfig:
    return relevant(base.replace(norm=norm, **params).validate())


def recipe_text(params: dict) -> str:
    """A trial's recipe in a few words: lr 0.0443 one-cycle, dropout 0.163, L1 1.2e-05."""
    l1 = f", L1 {params['l1']:.2g}" if "l1" in params else ""
    return f"lr {params['lr']:.3g} {params['schedule']}, dropout {params['dropout']:.3f}{l1}"


def _tell(study: optuna.Study, number: int, result: TrainResult) -> bool:
    """Tell a trial's result; False if it has none (its process died, another process holds its run):
    it stays asked, for the same command to train again. A trial whose loss became non-finite is told
    as pruned: TPE then counts its recipe among the bad ones (a failed trial it would ignore)."""
    metrics = result.metrics
    if metrics["status"] == "finished":
        study.tell(number, metrics["final_validation_accuracy"])
    elif metrics["status"] == "failed" and "step" in metrics.get("failure", {}):
        study.tell(number, state=TrialState.PRUNED)
    else:
        return False
    return True


def tune(norms: list[str], base: TrainConfig, trials: int, runs_dir: Path | str, options: Options = Options(),
         jobs: int | None = 1, cluster: str | None = None, show: bool = False, warn=lambda message: None,
         say=lambda message: None, dataset=None) -> tuple[dict, list[TrainResult]]:
    """Tune each variant until it has `trials` trials told, round by round (see the module's
    docstring), into `runs_dir`; `base` holds the fixed settings (dataset, epochs, train_size,
    validation, seed). Returns the tuning's summary (summarize) and the trials that ended without a
    result (their process died: the same command trains them again). `dataset`: a dataset's images
    by name, as grid.run takes it (default: data.loader's)."""
    runs_dir = Path(runs_dir)
    images = dataset or data.loader(options.data_dir, warn)  # one load: the split's check, the runs trained here
    train_idx, _ = data.validation_split(images(base.dataset).y_train, base.validation, base.train_size)
    for norm in norms:  # every trial's settings but its recipe, checked before the database is touched
        preflight(base.replace(norm=norm), runs_dir, force=True)
    path = database(runs_dir, base.dataset)
    with _opened(path) as storage:
        studies = _studies(storage, path, norms, base)
        say(f"tuning {', '.join(norms)}: {trials} trials each, {base.epochs} epoch{'s' if base.epochs != 1 else ''} of "
            f"{len(train_idx):,} training images, measured on {base.validation:,} held out; database {path}")
        unfinished = []
        while not unfinished:
            asked = [(norm, trial) for norm, study in studies.items() for trial in _round(study, norm, base.seed, trials)]
            if not asked:
                break
            runs = []
            for norm, trial in asked:  # checked above but for the recipe, which the space keeps in range
                runs.append(RunSpec(trial_config(base, norm, trial.params), runs_dir / f"trial-{trial.number}", False,
                                    f"{norm} trial {trial.number}"))
                say(f"{norm} trial {trial.number}: {recipe_text(trial.params)}")
            results = grid.run(runs, jobs, cluster, options, show=show, warn=warn, dataset=images)
            for (norm, trial), result in zip(asked, results):
                if not _tell(studies[norm], trial.number, result):
                    unfinished.append(result)
        summary = summarize(studies, base, runs_dir, trials, len(train_idx))
        write_json(path.with_name(SUMMARY), summary)
    return summary, unfinished


def summarize(studies: dict[str, optuna.Study], base: TrainConfig, runs_dir: Path, trials: int,
              train_images: int) -> dict:
    """The tuning as tune.json holds it: its settings, and per variant every trial (its number, state,
    validation accuracy, recipe and run directory under the runs directory) and the best, the finished
    trial of the highest validation accuracy (the first of equals)."""
    variants = {}
    for norm, study in studies.items():
        rows = [{"number": t.number, "state": STATES[t.state], "validation_accuracy": t.value, "params": t.params,
                 "run": str(RunSpec(trial_config(base, norm, t.params), Path(f"trial-{t.number}"), False, "").run.path)}
                for t in study.get_trials(deepcopy=False)]
        finished = [row for row in rows if row["state"] == "finished"]
        variants[norm] = {"trials": rows, "best": max(finished, key=lambda r: (r["validation_accuracy"], -r["number"]),
                                                      default=None)}
    common = settings(base, next(iter(studies)))
    return {"dataset": base.dataset, "trials": trials, "train_images": train_images,
            "settings": {k: v for k, v in common.items() if k != "space"},
            "space": {norm: settings(base, norm)["space"] for norm in studies}, "variants": variants}


def raise_if_unfinished(unfinished: list[TrainResult]) -> None:
    """After the table and figure: RunFailed naming the trials whose process died, else a NormtfError
    naming those another normtf process was training; either way the same command goes on."""
    failed = [r for r in unfinished if r.metrics["status"] == "failed"]
    if failed:
        raise RunFailed(f"{len(failed)} trials did not finish: " + "; ".join(
            f"{r.run.path} ({r.metrics['failure']['reason']})" for r in failed)
            + "; their finished epochs are kept: run the same command again to go on")
    if unfinished:
        raise NormtfError(f"{len(unfinished)} trials were being trained by another normtf process: "
                          + ", ".join(str(r.run.path) for r in unfinished) + "; run the same command again once "
                          "it has finished")


# --- what a tuning found -------------------------------------------------------------------------

def best_recipes(tune_dir: Path | str, norms: list[str], dataset: str, warn=lambda message: None) -> dict[str, dict]:
    """Each variant's best trial in the tuning in `tune_dir` (--recipe best): {"params", "number",
    "validation_accuracy", "finished"}. NormtfError if there is no tuning there, or none of a variant
    with a finished trial."""
    path = database(tune_dir, dataset)
    flag = "" if dataset == data.DEFAULT else f" --dataset {dataset}"
    if not path.is_file():
        raise NormtfError(f"--recipe best: no tuning in {tune_dir} ({path} does not exist); tune first (normtf tune"
                          f"{flag} --runs-dir {tune_dir}), or name the tuning's --runs-dir with --tune-dir")
    storage = _storage(path, "--tune-dir")
    try:
        names = {study.study_name for study in storage.get_all_studies()}
        best, missing = {}, []
        for norm in norms:
            study = optuna.load_study(study_name=norm, storage=storage) if norm in names else None
            trials = study.get_trials(deepcopy=False) if study else []
            finished = [t for t in trials if t.state == TrialState.COMPLETE]
            if not finished:
                missing.append(norm)
                continue
            top = max(finished, key=lambda t: (t.value, -t.number))
            best[norm] = {"params": top.params, "number": top.number, "validation_accuracy": top.value,
                          "finished": len(finished)}
            if any(t.state == TrialState.RUNNING for t in trials):
                warn(f"{norm}: the tuning in {path} has unfinished trials; its best of the {len(finished)} finished "
                     "is used")
    finally:
        storage.engine.dispose()
    if missing:
        raise NormtfError(f"--recipe best: {path} has no finished trial of {', '.join(missing)}; tune "
                          f"{'it' if len(missing) == 1 else 'them'} first: normtf tune "
                          f"{' '.join(f'--norm {norm}' for norm in missing)}{flag} --runs-dir {tune_dir}")
    return best


def draw(summary: dict, path: Path) -> Path:
    """Validation accuracy against learning rate, a panel per variant (figures.tuning_figure)."""
    return figures.save(figures.tuning_figure(*tuning_panels(summary)), path)


def tuning_panels(summary: dict) -> tuple[dict, str, tuple[float, float]]:
    """figures.tuning_figure's panels, title and learning-rate axis of a tuning (tune.json)."""
    panels = {}
    for norm, variant in summary["variants"].items():
        best = variant["best"]
        panels[norm] = {"label": norm if best is None else f"{norm}: best {100 * best['validation_accuracy']:.2f}%",
                        "color": color(norm),
                        "trials": [{"lr": row["params"]["lr"], "schedule": row["params"]["schedule"],
                                    "accuracy": row["validation_accuracy"] if row["state"] == "finished" else None,
                                    "best": best is not None and row["number"] == best["number"]}
                                   for row in variant["trials"] if row["state"] in ("finished", "diverged")]}
    fixed = summary["settings"]["fixed"]
    epochs = f"{fixed['epochs']} epoch{'s' if fixed['epochs'] != 1 else ''}"
    title = (f"{data.DATASETS[summary['dataset']].title}, validation accuracy of each trial: {epochs} of "
             f"{summary['train_images']:,} training images,\nmeasured on {fixed['validation']:,} held out of the "
             f"training set; batch {fixed['batch_size']}, momentum {fixed['momentum']:g}, seed {fixed['seed']}")
    low, high = next(iter(summary["space"].values()))["lr"][:2]  # every variant searches the same rates
    return panels, title, (low, high)
