"""The one place that holds a training run's settings, with the reference study's values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from normtf.errors import UsageError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers. Defaults are the reference recipe (docs/study.md)."""

    norm: str = "batch-l1"
    dataset: str = "mnist"  # one of DATASET_NAMES
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.01  # the peak rate under the one-cycle schedule
    schedule: str = "constant"
    momentum: float = 0.9
    dropout: float = 0.1
    l1: float = 5e-4
    groups: int = 2
    rotation: float = 8.0
    seed: int = 42
    train_size: int | None = None
    test_size: int | None = None
    validation: int | None = None  # training images held out to measure the run on, instead of the test set (normtf tune)
    precision: str = "auto"
    jit: str = "auto"
    deterministic: bool = False
    strategy: str = "default"
    sync_bn: bool = False
    steps_per_execution: int | None = None  # training steps per call into TensorFlow; None: 1 on CPU, 32 on a GPU

    def validate(self) -> TrainConfig:
        """Every field checked by RULES, plus the choices; raises UsageError on the first bad one."""
        check_options(self.to_dict())
        if self.train_size is not None and self.batch_size > self.train_size:
            raise UsageError(f"--batch-size {self.batch_size} is more than the {self.train_size:,} training images "
                             "of --train-size")
        return self

    @property
    def evaluated_on(self) -> str:
        """What the run is measured on after each epoch: "validation", its validation split (carved from
        the training set, data.validation_split), if it has one; else "test", the test set."""
        return "validation" if self.validation else "test"

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


SCHEDULES = ("constant", "one-cycle")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_MODES = ("auto", "on", "off")
STRATEGIES = ("default", "mirrored", "multi-worker")

MAX_SEED = 2**32 - 1  # what keras.utils.set_random_seed (NumPy's seed) accepts
MAX_JOBS = 256  # --jobs: runs trained at once

# What checking a command's values must know of the model and the data, kept here so that the check
# starts neither Keras nor NumPy and config imports nothing that imports it (imports run downhill:
# models.py builds the network from BLOCKS, data.py keys its table of datasets by DATASET_NAMES).
# BLOCKS: (filters, kernel, padding) of the six normalized blocks of the study's network
# (docs/study.md); the 1x1 transition and max-pool sit after block 2.
BLOCKS = [(14, 3, "valid"), (28, 3, "valid"), (14, 3, "valid"), (12, 3, "valid"), (12, 3, "valid"), (12, 3, "same")]
DATASET_NAMES = ("mnist", "fashion-mnist")  # what --dataset takes; data.DATASETS describes each, in this order


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(low: int, high: float = math.inf):
    return lambda v: isinstance(v, int) and low <= v <= high


def valid_groups() -> tuple[int, ...]:
    """The group counts the model accepts: those dividing the channel count of every block."""
    channels = [filters for filters, _, _ in BLOCKS]
    return tuple(g for g in range(1, min(channels) + 1) if all(c % g == 0 for c in channels))


# Every value a command takes, by its parameter name: (accepts, what it must be). The CLI checks
# all of a command's values against this table before it loads data or touches a file, and
# TrainConfig.validate checks a config's fields against it, so the two can never disagree.
RULES = {
    "dataset": (lambda v: v in DATASET_NAMES, f"one of {', '.join(DATASET_NAMES)}"),
    "epochs": (_whole(1), "a whole number, at least 1"),
    "batch_size": (_whole(1), "a whole number, at least 1"),
    "lr": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "momentum": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1] (Keras's range for SGD)"),
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "l1": (lambda v: _number(v) and v >= 0, "a finite number, 0 or more"),
    "groups": (lambda v: v in valid_groups(),
               f"a count that divides every block's channel count ({' or '.join(map(str, valid_groups()))})"),
    "rotation": (lambda v: _number(v) and 0 <= v <= 180, "an angle in degrees from 0 to 180"),
    "seed": (_whole(0, MAX_SEED), f"a whole number from 0 to {MAX_SEED:,}"),
    "train_size": (_whole(1), "a whole number, at least 1"),
    "test_size": (_whole(1), "a whole number, at least 1"),
    "validation": (_whole(1), "a whole number, at least 1"),
    "trials": (_whole(1, 10_000), "a whole number from 1 to 10,000"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "jit": (lambda v: v in JIT_MODES, f"one of {', '.join(JIT_MODES)}"),
    "strategy": (lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    "steps_per_execution": (_whole(1, 1000), "a whole number from 1 to 1,000"),
    "count": (_whole(1, 10_000), "a whole number from 1 to 10,000"),
    "jobs": (lambda v: v == "auto" or (str(v).isdigit() and 1 <= int(v) <= MAX_JOBS), f"auto or a whole number from 1 to {MAX_JOBS}"),
    "cluster": (lambda v: bool(str(v).strip()), "an address of a Ray cluster (auto, ray://host:10001) or local"),
    "repeats": (_whole(1, 100), "a whole number from 1 to 100"),
    "steps": (_whole(1, 100_000), "a whole number from 1 to 100,000"),
    # Parsed by their own functions, which raise the specific message; valid values pass.
    "seeds": (lambda v: parse_seeds(v, 0) is not None, ""),
    "batch_sizes": (lambda v: parse_batch_sizes(v) is not None, ""),
}


def check_options(values: dict) -> None:
    """UsageError naming the first value in `values` (parameter name -> value) that RULES refuses."""
    for name, value in values.items():  # None: not given, or a setting this variant does not use
        if name in RULES and value is not None and not RULES[name][0](value):
            raise UsageError(f"--{name.replace('_', '-')} must be {RULES[name][1]} (got {value!r})")

# Named starting points for a config; flags given on the command line override them.
# tuned: the learning rate warms up to 0.05 and anneals to zero (one-cycle), so the last epochs are
# the best ones. L1 50x weaker: at 5e-4 it cost batch norm 0.7 points (reference recipe, seed 42:
# 98.48% with it, 99.19% without). Half the dropout: a 15-epoch pilot of this recipe with dropout 0.1
# (batch-l1, seed 42) ended at 99.39% test but 99.07% train accuracy, so the model underfits.
RECIPES = {
    "reference": {},
    "tuned": {"schedule": "one-cycle", "lr": 0.05, "dropout": 0.05, "l1": 1e-5},
}


# best: each variant's own recipe, the best trial of a tuning (normtf tune), read from the tuning's
# database by normtf.tune.best_recipes: values for TUNE_SPACE's fields, on the reference recipe.
BEST_RECIPE = "best"
RECIPE_NAMES = (*RECIPES, BEST_RECIPE)


def recipe(name: str, values: dict | None = None) -> TrainConfig:
    """A named recipe's config; `values`: the best recipe's, which no name fixes."""
    if name not in RECIPE_NAMES:
        raise UsageError(f"--recipe must be one of {', '.join(RECIPE_NAMES)} (got {name!r})")
    return TrainConfig(**(values if name == BEST_RECIPE else RECIPES[name]))


# normtf tune's search space, by TrainConfig field: (lowest, highest, "log" or "linear") for a number,
# the choices for a name. l1 only for the variants with L1 (norms.py). Momentum stays 0.9: with the
# learning rate it sets one step size, lr / (1 - momentum), so it would add a dimension that mostly
# repeats lr's. Batch size stays 128: it changes a trial's steps and time, so trials would no longer
# have one budget (the batch-size sweep asks about it).
TUNE_SPACE = {"lr": (1e-3, 1.0, "log"), "schedule": SCHEDULES, "dropout": (0.0, 0.3, "linear"),
              "l1": (1e-6, 1e-3, "log")}
# Its defaults: the eight variants that learn, 20 trials each, in about four hours on 2 cores with
# --jobs 2: a trial of 5 epochs of the 50,000 training images the split leaves takes about 2.4
# minutes on one thread (the arithmetic: docs/how-it-works.md, "Tuning each variant's own recipe").
TUNE_TRIALS, TUNE_EPOCHS, TUNE_VALIDATION = 20, 5, 10_000


# The batch-size sweep's defaults (normtf sweep): the budget of 2 epochs of 20,000 images.
SWEEP_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)
SWEEP_EPOCHS, SWEEP_TRAIN_SIZE = 2, 20_000
SWEEP_SEEDS = 3  # every point over three seeds: one draw per point cannot tell a trend from noise


MAX_SEED_COUNT = 10


def parse_seeds(text: str | None, first: int) -> list[int] | None:
    """--seeds: a list ("42,43,44") or a count ("3": `first` and the next two); None if not given."""
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
                             f"{count}; for more than {MAX_SEED_COUNT} seeds list them, separated by commas")
        values = list(range(first, first + count))
    for value in values:
        if not RULES["seed"][0](value):
            raise UsageError(f"--seeds: every seed must be {RULES['seed'][1]} (got {value})")
    return list(dict.fromkeys(values))


def parse_batch_sizes(text: str) -> list[int]:
    """--batch-sizes "2,4,8": distinct whole numbers, at least 1, in increasing order."""
    try:
        sizes = sorted({int(size) for size in text.split(",")})
    except ValueError:
        raise UsageError(f"--batch-sizes takes whole numbers separated by commas (got {text!r})") from None
    if not RULES["batch_size"][0](sizes[0]):
        raise UsageError(f"--batch-sizes must be whole numbers, at least 1 (got {text!r})")
    return sizes
