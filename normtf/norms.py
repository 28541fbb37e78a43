"""The one table that knows the normalization variants. Adding a variant touches this file (and,
for `normtf bench` to time it against PyTorch, its counterpart in torch_reference.py).

Keras is imported inside the factories so that the CLI can list the variants without loading it.
The layers are normtf.fused_norms' drop-ins for Keras's own (same weights and results, faster on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from normtf.config import TrainConfig
from normtf.errors import UsageError

EPS = 1e-5  # PyTorch's default for BatchNorm2d, GroupNorm and LayerNorm; Keras's defaults differ


@dataclass(frozen=True)
class Norm:
    make: Callable[[TrainConfig], object]  # config -> a Keras layer
    description: str
    l1: bool = False  # add the L1 kernel penalty (the study's "batch norm + L1" run)
    uses: frozenset[str] = frozenset()  # which of VARIANT_SETTINGS this variant reads


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


NORMS: dict[str, Norm] = {
    "batch-l1": Norm(_batch, "batch norm + L1 on the kernels (the study's run)", l1=True,
                     uses=frozenset({"l1", "sync_bn"})),
    "batch": Norm(_batch, "batch norm without L1 (the control the study lacks)",
                  uses=frozenset({"sync_bn"})),
    "layer": Norm(_layer, "layer norm over (H, W, C) with element-wise gamma/beta, as PyTorch LayerNorm([C, H, W])"),
    "group": Norm(_group, "group norm, per-channel gamma/beta, --groups groups (2 in the study)",
                  uses=frozenset({"groups"})),
    "layer-c": Norm(_layer_per_channel,
                    "layer norm with per-channel gamma/beta (group norm with one group): 9,910 parameters"),
}


VARIANT_SETTINGS = frozenset({"l1", "groups", "sync_bn"})


def get_norm(name: str) -> Norm:
    if name not in NORMS:
        raise UsageError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def relevant(config: TrainConfig) -> TrainConfig:
    """The config with the settings its variant does not use set to None, so that e.g. --l1 does
    not make a layer-norm run count as different from one trained without it, and a stored
    config.json does not show an L1 strength that was never applied."""
    ignored = VARIANT_SETTINGS - get_norm(config.norm).uses
    return config.replace(**{name: None for name in ignored})


def color(name: str) -> str:
    """The same matplotlib color for a variant in every figure: its place in this table."""
    return f"C{list(NORMS).index(name)}"
