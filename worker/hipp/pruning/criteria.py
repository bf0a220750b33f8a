"""Importance criteria: how much each attention head and MLP channel of a layer matters.

Each criterion scores units of one layer; selection (which units to keep, given how many) and allocation
(how many per layer) live elsewhere. Criteria that need data declare it with ``needs_activations``.

- magnitude: L1 mass of the unit's weights in its producer rows and consumer columns.
- wanda-sp: Wanda for structured units (An et al. FLAP / Sun et al. Wanda): for each input channel of the
  consumer, its calibration activation L2 norm times the L1 norm of its weight column; summed over a
  head's ``head_dim`` block for heads.
- random: seeded noise, the floor every criterion must beat.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from worker.hipp.data.calibration import LayerActivations
from worker.hipp.errors import OptionError
from worker.hipp.models.adapters.base import LayerAdapter


@dataclass
class LayerScores:
    """Scores of one layer's query heads and MLP channels (higher = more important)."""

    heads: torch.Tensor
    channels: torch.Tensor

    def kv_group_scores(self, num_kv_heads: int) -> torch.Tensor:
        return self.heads.view(num_kv_heads, -1).sum(dim=1)


class Criterion(ABC):
    name: ClassVar[str]
    needs_activations: ClassVar[bool] = False

    @abstractmethod
    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        """Scores for ``layer``; ``activations`` is given when ``needs_activations``."""


def _head_blocks(per_dim: torch.Tensor, head_dim: int) -> torch.Tensor:
    return per_dim.view(-1, head_dim).sum(dim=1)


class MagnitudeCriterion(Criterion):
    name = "magnitude"

    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        d = layer.head_dim
        q_rows = layer.q_proj.weight.detach().abs().float().sum(dim=1)
        o_cols = layer.o_proj.weight.detach().abs().float().sum(dim=0)
        heads = _head_blocks(q_rows + o_cols, d)
        producers = sum(lin.weight.detach().abs().float().sum(dim=1) for lin in layer.mlp_producers())
        consumer = layer.down_proj.weight.detach().abs().float().sum(dim=0)
        return LayerScores(heads=heads.cpu(), channels=(producers + consumer).cpu())


class WandaSPCriterion(Criterion):
    name = "wanda-sp"
    needs_activations = True

    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        if activations is None:
            raise OptionError("wanda-sp needs calibration activations")
        o_cols = layer.o_proj.weight.detach().abs().float().sum(dim=0).cpu()
        down_cols = layer.down_proj.weight.detach().abs().float().sum(dim=0).cpu()
        heads = _head_blocks(o_cols * activations.o_proj_norm.float(), layer.head_dim)
        channels = down_cols * activations.down_proj_norm.float()
        return LayerScores(heads=heads, channels=channels)


class RandomCriterion(Criterion):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer.index)
        return LayerScores(
            heads=torch.rand(layer.num_heads, generator=gen),
            channels=torch.rand(layer.intermediate_size, generator=gen),
        )


CRITERIA: dict[str, type[Criterion]] = {
    c.name: c for c in (MagnitudeCriterion, WandaSPCriterion, RandomCriterion)
}


def get_criterion(name: str, seed: int = 0) -> Criterion:
    if name not in CRITERIA:
        raise OptionError(f"unknown criterion {name!r}; use one of {', '.join(CRITERIA)}")
    cls = CRITERIA[name]
    return cls(seed) if cls is RandomCriterion else cls()  # type: ignore[call-arg]
