"""The one place that holds a training run's settings, with the reference study's values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from normtf.errors import UsageError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers. Defaults are the reference recipe (REFERENCE.md)."""

    norm: str = "batch-l1"
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
    precision: str = "auto"
    jit: str = "auto"
    deterministic: bool = False
    strategy: str = "default"
    sync_bn: bool = False

    def validate(self) -> TrainConfig:
        checks = [
            (self.epochs > 0, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.batch_size > 0, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.momentum >= 0, f"--momentum must be 0 or more (got {self.momentum})"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1) (got {self.dropout})"),
            (self.l1 >= 0, f"--l1 must be 0 or more (got {self.l1})"),
            (self.groups > 0, f"--groups must be at least 1 (got {self.groups})"),
            (self.rotation >= 0, f"--rotation must be 0 or more degrees (got {self.rotation})"),
            (self.train_size is None or self.train_size > 0,
             f"--train-size must be at least 1 (got {self.train_size})"),
            (self.test_size is None or self.test_size > 0,
             f"--test-size must be at least 1 (got {self.test_size})"),
            (self.schedule in SCHEDULES,
             f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})"),
            (self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})"),
            (self.jit in JIT_MODES, f"--jit must be one of {', '.join(JIT_MODES)} (got {self.jit!r})"),
            (self.strategy in STRATEGIES,
             f"--strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self

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

# Named starting points for a config; flags given on the command line override them.
# tuned: the learning rate warms up to 0.05 and anneals to zero (one-cycle), so the last epochs are
# the best ones. L1 50x weaker: at 5e-4 it cost batch norm half a point (reference recipe: 98.75%
# with it, 99.27% without). Half the dropout: a 15-epoch pilot of this recipe with dropout 0.1
# (batch-l1, seed 42) ended at 99.39% test but 99.07% train accuracy, so the model underfits.
RECIPES = {
    "reference": {},
    "tuned": {"schedule": "one-cycle", "lr": 0.05, "dropout": 0.05, "l1": 1e-5},
}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise UsageError(f"--recipe must be one of {', '.join(RECIPES)} (got {name!r})")
    return TrainConfig(**RECIPES[name])


# The batch-size sweep's defaults (normtf sweep): the budget of 2 epochs of 20,000 images.
SWEEP_NORMS = ("batch", "layer", "group")
SWEEP_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)
SWEEP_EPOCHS, SWEEP_TRAIN_SIZE = 2, 20_000
