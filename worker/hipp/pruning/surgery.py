"""Apply a plan physically: slice the decoder's linears so the pruned model is smaller and faster.

Query heads are reordered so that each kept KV head serves a contiguous block of its own kept query heads
(the layout ``repeat_kv`` assumes). Nothing inside a head is sliced (RoPE pairs its dimensions).

With a :class:`~worker.hipp.pruning.bias_compensation.BiasCompensation` (FLAP), the mean contribution of the
removed o_proj / down_proj input channels is folded into those linears' biases before they are sliced
(``bias_compensation.fold_layer``); the export records which layers gained a bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.hipp.errors import PlanError
from worker.hipp.models.adapters.base import LayerAdapter, LayerShape, ModelAdapter
from worker.hipp.pruning.bias_compensation import BiasCompensation, LayerMeans, fold_layer
from worker.hipp.pruning.plan import LayerPlan, PruningPlan, geometry_of


def _rows(index: Sequence[int], block: int) -> torch.Tensor:
    return torch.tensor([i * block + d for i in index for d in range(block)], dtype=torch.long)


@torch.no_grad()
def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep ``rows`` (output features) and/or ``cols`` (input features) of ``linear``, in place."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows.to(weight.device)).clone(),
                                       requires_grad=linear.bias.requires_grad)
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def prune_layer(layer: LayerAdapter, shape: LayerShape, lp: LayerPlan, means: LayerMeans | None = None) -> None:
    """Slice ``layer`` to ``lp``; with ``means``, fold the removed channels' mean contribution into the
    o_proj / down_proj biases first (it needs the dense columns)."""
    if means is not None:
        fold_layer(layer, lp, means)
    d = shape.head_dim
    heads = _rows(lp.head_order(shape), d)
    kv = _rows(lp.kv_heads, d)
    slice_linear(layer.q_proj, rows=heads)
    slice_linear(layer.k_proj, rows=kv)
    slice_linear(layer.v_proj, rows=kv)
    slice_linear(layer.o_proj, cols=heads)
    layer.set_head_counts(len(lp.heads), len(lp.kv_heads))
    channels = torch.tensor(lp.channels, dtype=torch.long)
    for producer in layer.mlp_producers():
        slice_linear(producer, rows=channels)
    slice_linear(layer.down_proj, cols=channels)


def apply_plan(adapter: ModelAdapter, plan: PruningPlan, compensation: BiasCompensation | None = None) -> None:
    """Slice the model behind ``adapter`` to ``plan``, in place. The model must be dense and match the plan.
    ``compensation``: fold the removed channels' calibration means into o_proj / down_proj biases (FLAP)."""
    plan.validate()
    if compensation is not None:
        compensation.check(plan)
    current = geometry_of(adapter)
    if current.layers != plan.geometry.layers or current.hidden_size != plan.geometry.hidden_size:
        raise PlanError("the plan was made for a model of another shape (or this model is already pruned)")
    for i, (layer, shape, lp) in enumerate(zip(adapter.layers(), plan.geometry.layers, plan.layers, strict=True)):
        if lp != LayerPlan.dense(shape):
            prune_layer(layer, shape, lp, compensation.layers[i] if compensation is not None else None)
