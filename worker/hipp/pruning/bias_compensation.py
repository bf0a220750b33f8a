"""Bias compensation (FLAP, An et al. AAAI 2024): removed input channels of ``o_proj`` / ``down_proj`` are
replaced by their calibration mean, folded into the consumer's bias.

A consumer ``y = W x (+ b)`` that loses the input channels ``R`` is, with those channels held at their mean
``mu``, ``y = W[:, K] x[K] + (b + W[:, R] @ mu[R])``: the pruned linear plus a new bias. This module holds that
math (:func:`compensation_bias`, :func:`fold_bias`), the per-layer means it needs (:class:`LayerMeans`,
:class:`BiasCompensation`), and the reference the surgery must reproduce: the dense model with the removed
channels replaced by their means (:func:`mean_replacement`), used by the tests.

Imports only torch, the layer adapter and the plan (no allocator, no criterion).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.hipp.errors import PlanError
from worker.hipp.models.adapters.base import LayerAdapter, ModelAdapter
from worker.hipp.pruning.plan import LayerPlan, PruningPlan


@dataclass(frozen=True)
class LayerMeans:
    """Mean calibration input of every input channel (original indices) of one layer's two consumers."""

    o_proj: torch.Tensor
    down_proj: torch.Tensor


@dataclass(frozen=True)
class BiasCompensation:
    """The per-layer means a plan's compensation needs (one :class:`LayerMeans` per decoder layer)."""

    layers: tuple[LayerMeans, ...]

    def save(self, path: str | Path) -> None:
        """Write the means as safetensors (``<layer>.o_proj`` / ``<layer>.down_proj``, float64): with the plan's
        JSON, a compensated plan replays without re-running calibration."""
        from safetensors.torch import save_file

        tensors = {}
        for i, means in enumerate(self.layers):
            tensors[f"{i}.o_proj"] = means.o_proj.double().contiguous()
            tensors[f"{i}.down_proj"] = means.down_proj.double().contiguous()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path) -> BiasCompensation:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        count = len(tensors) // 2
        try:
            return cls(tuple(LayerMeans(tensors[f"{i}.o_proj"], tensors[f"{i}.down_proj"]) for i in range(count)))
        except KeyError as exc:
            raise PlanError(f"{path} is not a bias compensation file: {exc} is missing") from None

    def check(self, plan: PruningPlan) -> None:
        """Raise :class:`PlanError` if the means do not have the plan's dense widths."""
        if len(self.layers) != plan.geometry.num_layers:
            raise PlanError(f"bias compensation has {len(self.layers)} layers, the plan {plan.geometry.num_layers}")
        for i, (shape, means) in enumerate(zip(plan.geometry.layers, self.layers, strict=True)):
            if means.o_proj.numel() != shape.num_heads * shape.head_dim:
                raise PlanError(f"layer {i}: o_proj means have {means.o_proj.numel()} channels")
            if means.down_proj.numel() != shape.intermediate_size:
                raise PlanError(f"layer {i}: down_proj means have {means.down_proj.numel()} channels")


def head_columns(heads: Sequence[int], head_dim: int) -> list[int]:
    """``o_proj`` input columns of ``heads`` (original indices, each head a contiguous ``head_dim`` block)."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def removed_columns(width: int, kept: Sequence[int]) -> torch.Tensor:
    """Sorted indices in ``[0, width)`` that are not in ``kept``."""
    mask = torch.ones(width, dtype=torch.bool)
    mask[torch.as_tensor(list(kept), dtype=torch.long)] = False
    return mask.nonzero().flatten()


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]`` in float64: the output the removed channels contribute on average."""
    w = weight.detach().double().cpu().index_select(1, removed)
    return w @ mean.double().cpu().index_select(0, removed)


@torch.no_grad()
def fold_bias(linear: nn.Linear, mean: torch.Tensor, kept: Sequence[int]) -> None:
    """Add the compensation of the input columns of ``linear`` not in ``kept`` to its bias (created when the
    linear has none), before the columns are sliced away. Nothing removed: the linear is left as it is."""
    removed = removed_columns(linear.in_features, kept)
    if removed.numel() == 0:
        return
    extra = compensation_bias(linear.weight, mean, removed)
    if linear.bias is not None:
        extra = extra + linear.bias.detach().double().cpu()
    weight = linear.weight
    linear.bias = nn.Parameter(extra.to(device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad)


def fold_layer(layer: LayerAdapter, lp: LayerPlan, means: LayerMeans) -> None:
    """Fold the compensation of ``lp``'s removed heads and channels into ``layer``'s o_proj / down_proj biases
    (call before surgery slices the layer)."""
    fold_bias(layer.o_proj, means.o_proj, head_columns(lp.heads, layer.head_dim))
    fold_bias(layer.down_proj, means.down_proj, lp.channels)


@contextmanager
def mean_replacement(adapter: ModelAdapter, plan: PruningPlan, compensation: BiasCompensation) -> Iterator[None]:
    """Inside the block, the (dense) model behind ``adapter`` sees every input channel of o_proj / down_proj
    that ``plan`` removes replaced by its mean: the function a compensated pruned model must compute."""

    def replace(removed: torch.Tensor, mean: torch.Tensor):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0].clone()
            idx = removed.to(x.device)
            x[..., idx] = mean.to(device=x.device, dtype=x.dtype).index_select(0, idx)
            return (x, *args[1:])

        return hook

    handles = []
    try:
        for layer, lp, means in zip(adapter.layers(), plan.layers, compensation.layers, strict=True):
            o_removed = removed_columns(layer.o_proj.in_features, head_columns(lp.heads, layer.head_dim))
            d_removed = removed_columns(layer.down_proj.in_features, lp.channels)
            handles.append(layer.o_proj.register_forward_pre_hook(replace(o_removed, means.o_proj)))
            handles.append(layer.down_proj.register_forward_pre_hook(replace(d_removed, means.down_proj)))
        yield
    finally:
        for handle in handles:
            handle.remove()
