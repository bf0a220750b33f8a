"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"), as its code (``prune_wanda_outlier``) computes
the layer ratios: layer outlier ratios ``D_l`` (share of Wanda element scores above ``M = 5`` times the layer
mean, ``allocators.outlier_ratios``) min-max scaled to ``[0, 2 lambda]``, then mean-centred, and
``ratio_l = s - (scaled_l - mean(scaled))``: the ratios average exactly ``s`` and lie in ``[s - 2 lambda,
s + 2 lambda]`` (within ``[s - lambda, s + lambda]`` when the outlier ratios are spread symmetrically), more
outliers -> less pruning. ``lambda`` defaults to the paper's 0.08.

OWL is an unstructured method; for heads and channels its ratio is applied to both unit types of a layer
(``wanda_sp.equal_split_counts``: Wanda-sp underneath, as OWL sits on Wanda). Gaps: the outlier ratio counts
Wanda scores of ``o_proj`` and ``down_proj`` only (the consumers whose inputs calibration records), not of all
seven linear layers; the MLP widths are corrected so the global budget holds exactly on GQA head rounding.

Imports ``allocators`` and ``baselines.wanda_sp``.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.hipp.errors import OptionError
from worker.hipp.pruning.allocators import ALLOCATORS, OWL_LAMBDA, AllocationContext, Allocator
from worker.hipp.pruning.baselines.wanda_sp import equal_split_counts
from worker.hipp.pruning.layer_counts import LayerCounts
from worker.hipp.pruning.plan import ModelGeometry


def owl_ratios(sparsity: float, outlier_ratios: Sequence[float], lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's per-layer sparsity: outlier ratios scaled to ``[0, 2 lam]``, mean-centred, subtracted from ``s``."""
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    if hi - lo <= 1e-12:
        return [sparsity] * len(outlier_ratios)
    scaled = [(d - lo) / (hi - lo) * 2 * lam for d in outlier_ratios]
    mean = sum(scaled) / len(scaled)
    return [min(1.0, max(0.0, sparsity - (x - mean))) for x in scaled]


@ALLOCATORS.register("owl-paper")
class OWLPaperAllocator(Allocator):
    """``lam``: OWL's lambda (the paper's default 0.08)."""

    needs_outlier_ratios = True

    def __init__(self, lam: float = OWL_LAMBDA) -> None:
        self.lam = lam

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        if context.outlier_ratios is None:
            raise OptionError("owl-paper allocation needs calibration outlier ratios (wanda-sp activations)")
        return owl_ratios(sparsity, context.outlier_ratios, self.lam)

    def layer_counts(
        self, geometry: ModelGeometry, sparsity: float, context: AllocationContext, mlp_multiple: int
    ) -> list[LayerCounts]:
        ratios = self.layer_ratios(geometry, sparsity, context)
        return equal_split_counts(geometry, ratios, sparsity, mlp_multiple, context.scores)
