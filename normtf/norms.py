"""The one table that knows the normalization variants. Adding a variant touches this file (and,
for `normtf bench` to time it against PyTorch, its counterpart in torch_reference.py, with
pytorch=True here).

Keras is imported inside the factories so that the CLI can list the variants without loading it.
Keras's layers come as normtf.fused_norms' drop-ins (same weights and results, faster on CPU); the two
that Keras lacks, batch renormalization and weight standardization, are plain Keras of ours
(normtf.renorm, normtf.wsconv): correctness and clarity over speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from normtf.config import TrainConfig
from normtf.errors import UsageError

EPS = 1e-5  # PyTorch's default for BatchNorm2d, GroupNorm and LayerNorm; Keras's defaults differ


@dataclass(frozen=True)
class Norm:
    make: Callable[[TrainConfig], object] | None  # config -> a Keras layer; None: no norm layer in the blocks
    description: str
    l1: bool = False  # add the L1 kernel penalty (the study's "batch norm + L1" run)
    uses: frozenset[str] = frozenset()  # which of VARIANT_SETTINGS this variant reads
    conv: Callable[..., object] | None = None  # the blocks' convolution class (Conv2D's arguments); None: Conv2D
    pytorch: bool = False  # has a PyTorch counterpart in torch_reference.py (`normtf bench --against reference`)
    swept: bool = False  # in `normtf sweep`'s default set
    moving: bool = False  # tests with moving batch statistics (batch norm's kind): the sweep also measures it with precise ones
    cost: float = 1.0  # a CPU epoch's time against batch norm's, which only orders a grid's runs (longest first)
    learns: bool = True  # learns in this network; `normtf tune` tunes those by default


def _batch(config):
    from normtf.fused_norms import BatchNormalization

    # PyTorch's momentum 0.1; --sync-bn: statistics over the global batch of all replicas.
    return BatchNormalization(momentum=0.9, epsilon=EPS, synchronized=config.sync_bn)


def _layer(config):
    from normtf.fused_norms import LayerNormalization

    return LayerNormalization(axis=(1, 2, 3), epsilon=EPS)  # element-wise gamma/beta over (H, W, C)


def _group(config):
    from normtf.fused_norms import GroupNormalization

    return GroupNormalization(groups=config.groups, epsilon=EPS)


def _layer_per_channel(config):
    from normtf.fused_norms import GroupNormalization

    return GroupNormalization(groups=1, epsilon=EPS)  # Wu & He's layer norm: one group


def _instance(config):
    from normtf.fused_norms import GroupNormalization

    return GroupNormalization(groups=-1, epsilon=EPS)  # Wu & He's instance norm: one group per channel


def _batch_renorm(config):
    from normtf.renorm import BatchRenormalization

    return BatchRenormalization(momentum=0.9, epsilon=EPS)  # batch norm's settings; rmax/dmax schedule: renorm.py


def _ws_conv(*args, **kwargs):
    from normtf.wsconv import WSConv2D

    return WSConv2D(*args, **kwargs)


# cost: the median epoch of results/reference/<variant>/ (history.json's epoch_time) over batch norm's,
# 27.2 s: batch-renorm's 46.3 s (its layer is plain Keras), none's 23.9 s; the others within 10% of 1.
NORMS: dict[str, Norm] = {
    "batch-l1": Norm(_batch, "batch norm + L1 on the kernels (the study's run)", l1=True,
                     uses=frozenset({"l1", "sync_bn"}), pytorch=True, moving=True),
    "batch": Norm(_batch, "batch norm without L1 (the control the study lacks)",
                  uses=frozenset({"sync_bn"}), pytorch=True, swept=True, moving=True),
    "layer": Norm(_layer, "layer norm over (H, W, C) with element-wise gamma/beta, as PyTorch LayerNorm([C, H, W])",
                  pytorch=True, swept=True),
    "group": Norm(_group, "group norm, per-channel gamma/beta, --groups groups (2 in the study)",
                  uses=frozenset({"groups"}), pytorch=True, swept=True),
    "layer-c": Norm(_layer_per_channel,
                    "layer norm with per-channel gamma/beta (group norm with one group): 9,910 parameters",
                    pytorch=True),
    "none": Norm(None, "no norm layer (conv -> ReLU -> dropout): what normalization buys", swept=True, cost=0.9),
    "instance": Norm(_instance, "instance norm (group norm with one group per channel)", learns=False),
    "batch-renorm": Norm(_batch_renorm, "batch renormalization (Ioffe 2017): batch norm whose training output is "
                                        "corrected towards the moving statistics", swept=True, moving=True,
                         cost=1.7),
    "group-ws": Norm(_group, "group norm (--groups groups) after weight-standardized convolutions (Qiao et al. 2019)",
                     uses=frozenset({"groups"}), conv=_ws_conv, swept=True),
}


VARIANT_SETTINGS = frozenset({"l1", "groups", "sync_bn"})


def get_norm(name: str) -> Norm:
    if name not in NORMS:
        raise UsageError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def sweep_defaults() -> list[str]:
    """`normtf sweep`'s variants when none is named."""
    return [name for name, spec in NORMS.items() if spec.swept]


def tune_defaults() -> list[str]:
    """`normtf tune`'s variants when none is named: those that learn (instance norm cannot, here)."""
    return [name for name, spec in NORMS.items() if spec.learns]


def relevant(config: TrainConfig) -> TrainConfig:
    """The config with the settings its variant does not use set to None, so that e.g. --l1 does
    not make a layer-norm run count as different from one trained without it, and a stored
    config.json does not show an L1 strength that was never applied."""
    ignored = VARIANT_SETTINGS - get_norm(config.norm).uses
    return config.replace(**{name: None for name in ignored})


def color(name: str) -> str:
    """The same matplotlib color for a variant in every figure: its place in this table."""
    return f"C{list(NORMS).index(name)}"
