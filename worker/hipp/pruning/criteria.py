"""Importance criteria: how much each attention head and MLP channel of a layer matters.

Each criterion is an object configured in its constructor (as Torch-Pruning's importance classes) with one
method, :meth:`Criterion.score_layer`, that scores the units of one layer; selection (which units to keep, given
how many) and allocation (how many per layer) live elsewhere. Criteria that need data declare it with
``needs_activations``. Every criterion registers in :data:`CRITERIA` under the name plans, the CLI and jobs
use; :func:`get_criterion` builds one from that name. A new criterion is one class here with
``@CRITERIA.register("its-name")``.

- magnitude: L1 mass of the unit's weights in its producer rows and consumer columns.
- wanda-sp: Wanda for structured units (An et al. FLAP / Sun et al. Wanda): for each input channel of the
  consumer, its calibration activation L2 norm times the L1 norm of its weight column; summed over a
  head's ``head_dim`` block for heads.
- random: seeded noise, the floor every criterion must beat.

Imports ``models`` (the layer adapter), ``data`` (calibration activations) and the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from worker.hipp.data.calibration import LayerActivations
from worker.hipp.errors import OptionError
from worker.hipp.models.adapters.base import LayerAdapter
from worker.hipp.registry import Registry


@dataclass
class LayerScores:
    """Scores of one layer's query heads and MLP channels (higher = more important)."""

    heads: torch.Tensor
    channels: torch.Tensor

    def kv_group_scores(self, num_kv_heads: int) -> torch.Tensor:
        return self.heads.view(num_kv_heads, -1).sum(dim=1)


class Criterion(ABC):
    """Scores the units of a layer; settings are constructor arguments."""

    needs_activations: ClassVar[bool] = False

    @classmethod
    def for_run(cls, seed: int) -> Criterion:
        """The instance the name-based API builds for a run seeded with ``seed``: default settings (criteria
        that draw random numbers override this to take the seed)."""
        return cls()

    @abstractmethod
    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        """Scores for ``layer``; ``activations`` is given when ``needs_activations``."""


def _head_blocks(per_dim: torch.Tensor, head_dim: int) -> torch.Tensor:
    return per_dim.view(-1, head_dim).sum(dim=1)


CRITERIA: Registry[type[Criterion]] = Registry("criterion", OptionError)


@CRITERIA.register("magnitude")
class MagnitudeCriterion(Criterion):
    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        d = layer.head_dim
        q_rows = layer.q_proj.weight.detach().abs().float().sum(dim=1)
        o_cols = layer.o_proj.weight.detach().abs().float().sum(dim=0)
        heads = _head_blocks(q_rows + o_cols, d)
        producers = sum(lin.weight.detach().abs().float().sum(dim=1) for lin in layer.mlp_producers())
        consumer = layer.down_proj.weight.detach().abs().float().sum(dim=0)
        return LayerScores(heads=heads.cpu(), channels=(producers + consumer).cpu())


@CRITERIA.register("wanda-sp")
class WandaSPCriterion(Criterion):
    needs_activations = True

    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        if activations is None:
            raise OptionError("wanda-sp needs calibration activations")
        o_cols = layer.o_proj.weight.detach().abs().float().sum(dim=0).cpu()
        down_cols = layer.down_proj.weight.detach().abs().float().sum(dim=0).cpu()
        heads = _head_blocks(o_cols * activations.o_proj_norm.float(), layer.head_dim)
        channels = down_cols * activations.down_proj_norm.float()
        return LayerScores(heads=heads, channels=channels)


@CRITERIA.register("random")
class RandomCriterion(Criterion):
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @classmethod
    def for_run(cls, seed: int) -> Criterion:
        return cls(seed=seed)

    def score_layer(self, layer: LayerAdapter, activations: LayerActivations | None) -> LayerScores:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer.index)
        return LayerScores(
            heads=torch.rand(layer.num_heads, generator=gen),
            channels=torch.rand(layer.intermediate_size, generator=gen),
        )


def get_criterion(name: str, seed: int = 0) -> Criterion:
    """The criterion registered as ``name``, built for a run seeded with ``seed``."""
    return CRITERIA.get(name).for_run(seed)
