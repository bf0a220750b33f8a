"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning"), as in its paper and repository
(CASIA-IVA-Lab/FLAP, ``lib/prune.py::prune_flap`` with ``--metrics WIFV --structure AL-AM``).

1. Statistics (:func:`collect_flap_statistics`): one pass of the calibration set through the *dense* model
   (FLAP's layer-by-layer pass feeds every layer the dense outputs of the one before, the same thing), with
   per-channel mean and sample variance of the inputs of ``o_proj`` and ``down_proj`` over real tokens.
2. WIFV (:func:`wifv`): input variance x squared L2 norm of the weight column, per input channel.
3. Per-layer standardization (:func:`flap_layer_scores`): for attention the repository squares the o_proj
   channel WIFV, standardizes it over the layer's ``num_heads * head_dim`` channels, then a head scores the
   *mean* of its ``head_dim`` standardized channels; MLP channels are their WIFV standardized over the layer's
   channels. (std is the unbiased one, as ``torch.std``.)
4. Adaptive structure search (:func:`global_search`): every unit of every layer, heads and channels together,
   ranked by standardized score; the best are kept while the kept parameters stay closest to ``(1 - s)`` of
   the prunable total, each unit weighted by its parameter count. Heads vs channels per layer fall out of the
   ranking. GQA: the plan needs the same number of query heads in every kept KV group, so the attention unit
   is a whole KV group (its query heads, K/V heads and o_proj columns; score the mean of its heads), exactly
   FLAP's head for multi-head attention (group size 1). A layer whose every group ranks out keeps its best one.
5. Bias compensation: the removed channels' calibration means, folded by surgery (:func:`prune_flap`,
   ``bias_compensation``).

:class:`FLAP` is the allocator (``"flap-paper"``); its :meth:`FLAP.layer_counts` reads FLAP's own standardized
scores from ``context.scores`` (made by :func:`flap_scores`); :func:`build_flap_plan` makes the whole plan (counts
and the units themselves, both from the ranking) and the compensation from a loaded model.

Imports the ``pruning`` room (plan, allocators, layer counts, criteria's ``LayerScores``, surgery, compensation)
and ``data`` (calibration batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from worker.hipp.data.calibration import CalibrationSample, stream_consumer_inputs, synthetic_samples
from worker.hipp.errors import OptionError
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.allocators import ALLOCATORS, AllocationContext, Allocator
from worker.hipp.pruning.bias_compensation import BiasCompensation, LayerMeans
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import LayerCounts, max_sparsity, validate_sparsity
from worker.hipp.pruning.plan import (
    LayerPlan,
    ModelGeometry,
    PruningPlan,
    attention_parameters,
    dense_layer_parameters,
    geometry_of,
    mlp_parameters,
)
from worker.hipp.pruning.rounding import rounding_cost_against
from worker.hipp.pruning.surgery import apply_plan

# --- statistics -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelStatistics:
    """Per input channel of one consumer: mean and sample variance over ``tokens`` calibration tokens."""

    mean: torch.Tensor
    variance: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class FlapLayerStatistics:
    o_proj: ChannelStatistics
    down_proj: ChannelStatistics


class _Moments:
    """Running sums in float64 (the variance of a few thousand bf16 activations needs them)."""

    def __init__(self, width: int) -> None:
        self.total = torch.zeros(width, dtype=torch.float64)
        self.squares = torch.zeros(width, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double().cpu()
        self.total += flat.sum(0)
        self.squares += (flat**2).sum(0)
        self.count += flat.shape[0]

    def statistics(self) -> ChannelStatistics:
        if self.count < 2:
            raise OptionError("FLAP needs at least two calibration tokens for a variance")
        mean = self.total / self.count
        variance = (self.squares - self.count * mean**2) / (self.count - 1)
        return ChannelStatistics(mean, variance.clamp_min(0.0), self.count)


def channel_statistics(x: torch.Tensor) -> ChannelStatistics:
    """Statistics of ``x`` (``[..., channels]``, every row a token)."""
    moments = _Moments(x.shape[-1])
    moments.add(x)
    return moments.statistics()


@torch.no_grad()
def collect_flap_statistics(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    batch_size: int = 8,
    max_length: int | None = 1024,
    reporter: Reporter = SILENT,
) -> list[FlapLayerStatistics]:
    """Mean and variance of every o_proj / down_proj input channel of the dense model over the real
    (non-padding) tokens of ``samples``."""
    moments = [{"o_proj": _Moments(la.o_proj.in_features), "down_proj": _Moments(la.down_proj.in_features)}
               for la in loaded.adapter.layers()]
    stream_consumer_inputs(loaded, samples, lambda layer, name, rows: moments[layer][name].add(rows),
                           batch_size, max_length, reporter)
    return [FlapLayerStatistics(m["o_proj"].statistics(), m["down_proj"].statistics()) for m in moments]


# --- scores -----------------------------------------------------------------------------------------------


def wifv(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted input feature variance of each input channel of ``weight`` (``[out, in]``): the channel's
    sample variance times the squared L2 norm of its weight column."""
    return variance.double() * weight.detach().double().cpu().pow(2).sum(dim=0)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over ``x`` (unbiased std, as FLAP's ``torch.std``); constant ``x`` -> zeros."""
    x = x.double()
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    if float(std) <= 0.0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


@dataclass
class FlapScores(LayerScores):
    """A layer's FLAP scores (standardized WIFV): the type :class:`FLAP` insists on, so that another
    criterion's raw scores are never ranked across layers and unit types by mistake."""


def flap_layer_scores(o_metric: torch.Tensor, down_metric: torch.Tensor, head_dim: int) -> FlapScores:
    """One layer's standardized scores from its per-channel WIFV: heads as the repository makes them (square,
    standardize over the layer's o_proj channels, mean over each head's ``head_dim`` block), MLP channels
    standardized over the layer."""
    attention = standardize(o_metric.double() ** 2)
    return FlapScores(heads=attention.view(-1, head_dim).mean(dim=1), channels=standardize(down_metric))


def flap_scores(loaded: LoadedModel, statistics: Sequence[FlapLayerStatistics]) -> list[FlapScores]:
    """Every layer's standardized FLAP scores (what :class:`FLAP` ranks)."""
    return [
        flap_layer_scores(wifv(st.o_proj.variance, la.o_proj.weight),
                          wifv(st.down_proj.variance, la.down_proj.weight), la.head_dim)
        for la, st in zip(loaded.adapter.layers(), statistics, strict=True)
    ]


# --- adaptive structure search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    score: float
    layer: int
    kind: int  # 0: a KV group of heads, 1: an MLP channel
    index: int
    cost: int


def _units(geometry: ModelGeometry, scores: Sequence[LayerScores]) -> list[_Unit]:
    hidden = geometry.hidden_size
    units = []
    for i, (shape, sc) in enumerate(zip(geometry.layers, scores, strict=True)):
        g = shape.group_size
        group_cost = attention_parameters(shape, hidden, g, 1)
        for kv in range(shape.num_kv_heads):
            units.append(_Unit(float(sc.heads[kv * g : (kv + 1) * g].double().mean()), i, 0, kv, group_cost))
        channel_cost = mlp_parameters(shape, hidden, 1)
        units += [_Unit(float(v), i, 1, c, channel_cost) for c, v in enumerate(sc.channels.tolist())]
    return units


def global_search(
    geometry: ModelGeometry, scores: Sequence[LayerScores], sparsity: float, mlp_multiple: int = 1
) -> list[LayerPlan]:
    """FLAP's adaptive structure search: keep the best-ranked units (all layers, heads and channels together)
    whose parameters come closest to ``1 - sparsity`` of the prunable total; the kept units of every layer."""
    validate_sparsity(sparsity)
    if sparsity > max_sparsity(geometry):
        raise OptionError(f"sparsity {sparsity:.3f} cannot be reached (at most {max_sparsity(geometry):.3f})")
    if len(scores) != geometry.num_layers:
        raise OptionError(f"{len(scores)} layer scores for {geometry.num_layers} layers")
    # Best first; ties by (layer, kind, index) so plans are deterministic.
    order = sorted(_units(geometry, scores), key=lambda u: (-u.score, u.layer, u.kind, u.index))
    total = sum(dense_layer_parameters(s, geometry.hidden_size) for s in geometry.layers)
    target = (1.0 - sparsity) * total
    kept, best, best_error = 0, 0, abs(target)
    for n, unit in enumerate(order, start=1):
        kept += unit.cost
        if abs(kept - target) < best_error:
            best, best_error = n, abs(kept - target)
    chosen = order[:best]
    return [_layer_plan(geometry, i, chosen, order, mlp_multiple) for i in range(geometry.num_layers)]


def _layer_plan(geometry: ModelGeometry, i: int, chosen: list[_Unit], order: list[_Unit],
                mlp_multiple: int) -> LayerPlan:
    shape = geometry.layers[i]
    groups = [u.index for u in chosen if u.layer == i and u.kind == 0]
    if not groups:  # the plan needs one head per layer: keep the layer's best-ranked group
        groups = [next(u.index for u in order if u.layer == i and u.kind == 0)]
    ranked_channels = [u.index for u in order if u.layer == i and u.kind == 1]
    width = sum(1 for u in chosen if u.layer == i and u.kind == 1)
    if mlp_multiple > 1 and width not in (0, shape.intermediate_size):
        width = min(shape.intermediate_size, int(round(width / mlp_multiple)) * mlp_multiple)
    g = shape.group_size
    heads = [kv * g + h for kv in sorted(groups) for h in range(g)]
    return LayerPlan(tuple(heads), tuple(sorted(groups)), tuple(sorted(ranked_channels[:width])))


def counts_of(plans: Sequence[LayerPlan]) -> list[LayerCounts]:
    return [LayerCounts(len(lp.kv_heads), len(lp.heads) // len(lp.kv_heads), len(lp.channels)) for lp in plans]


@ALLOCATORS.register("flap-paper")
class FLAP(Allocator):
    """FLAP's adaptive structure search as an allocator. ``context.scores`` must be FLAP's standardized scores
    (:func:`flap_scores`), not another criterion's: the ranking compares them across layers and unit types."""

    #: The caller must put :func:`flap_scores` (WIFV, standardized per layer) in ``context.scores``.
    needs_flap_scores: ClassVar[bool] = True

    def _plans(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext,
               mlp_multiple: int) -> list[LayerPlan]:
        if context.scores is None or not all(isinstance(s, FlapScores) for s in context.scores):
            raise OptionError("flap-paper allocation needs FLAP's standardized WIFV scores (flap_scores), "
                              "not another criterion's")
        return global_search(geometry, context.scores, sparsity, mlp_multiple)

    def layer_counts(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext,
                     mlp_multiple: int) -> list[LayerCounts]:
        """Kept units per layer as the global ranking decides them (heads vs channels included)."""
        return counts_of(self._plans(geometry, sparsity, context, mlp_multiple))

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        plan = PruningPlan(geometry, self._plans(geometry, sparsity, context, 1))
        return plan.layer_sparsities()


# --- the whole method ---------------------------------------------------------------------------------------


@dataclass
class FlapResult:
    """A FLAP plan (counts and units from the ranking), the compensation surgery folds in, and the scores."""

    plan: PruningPlan
    compensation: BiasCompensation
    scores: list[FlapScores]


def build_flap_plan(
    loaded: LoadedModel,
    sparsity: float,
    samples: Sequence[CalibrationSample] | None = None,
    mlp_multiple: int = 1,
    batch_size: int = 8,
    max_length: int | None = 1024,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> FlapResult:
    """Calibrate the dense model, score with WIFV, standardize per layer, search globally: the plan and the
    bias compensation for ``sparsity`` of the prunable LM-decoder parameters."""
    geometry = geometry_of(loaded.adapter)
    samples = samples if samples is not None else synthetic_samples(32, seed=seed)
    reporter.stage("calibrate", "FLAP fluctuation statistics")
    statistics = collect_flap_statistics(loaded, samples, batch_size, max_length, reporter)
    scores = flap_scores(loaded, statistics)
    reporter.stage("plan", "FLAP adaptive structure search")
    layers = global_search(geometry, scores, sparsity, mlp_multiple)
    meta: dict[str, object] = {
        "model": loaded.reference, "criterion": "wifv", "allocation": "flap-paper", "requested_sparsity": sparsity,
        "seed": seed, "bias_compensation": True, "calibration_tokens": statistics[0].o_proj.tokens,
    }
    if mlp_multiple > 1:  # against FLAP's own unrounded ranking, not the closest-option rule
        unrounded = counts_of(global_search(geometry, scores, sparsity, 1))
        meta["rounding"] = rounding_cost_against(geometry, sparsity, counts_of(layers), unrounded,
                                                 mlp_multiple).to_dict()
    plan = PruningPlan(geometry, layers, mlp_multiple=mlp_multiple, meta=meta)
    plan.validate()
    compensation = BiasCompensation(tuple(LayerMeans(st.o_proj.mean, st.down_proj.mean) for st in statistics))
    return FlapResult(plan, compensation, scores)


def prune_flap(loaded: LoadedModel, sparsity: float, samples: Sequence[CalibrationSample] | None = None,
               **options: object) -> FlapResult:
    """:func:`build_flap_plan`, then surgery with bias compensation, in place."""
    result = build_flap_plan(loaded, sparsity, samples, **options)  # type: ignore[arg-type]
    apply_plan(loaded.adapter, result.plan, result.compensation)
    return result
