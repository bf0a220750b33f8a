"""Apply a plan reversibly with masks: no weight copies, for fast search over many plans.

A removed head is silenced by zeroing its block of ``o_proj``'s input; a removed MLP channel by zeroing its
entry of ``down_proj``'s input. That is exactly what physical removal computes (removed KV heads only feed
removed query heads), so masked and sliced models give the same logits.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch.utils.hooks import RemovableHandle

from worker.hipp.models.adapters.base import ModelAdapter
from worker.hipp.pruning.plan import LayerPlan, PruningPlan


class PlanMasks:
    """Context manager (or call :meth:`remove`) holding the hooks that apply a plan."""

    def __init__(self, adapter: ModelAdapter, plan: PruningPlan) -> None:
        plan.validate()
        self._handles: list[RemovableHandle] = []
        for layer, (shape, lp) in zip(adapter.layers(), zip(plan.geometry.layers, plan.layers, strict=True),
                                      strict=True):
            if lp == LayerPlan.dense(shape):
                continue
            device = layer.o_proj.weight.device
            head_mask = torch.zeros(shape.num_heads, device=device)
            head_mask[list(lp.heads)] = 1.0
            o_mask = head_mask.repeat_interleave(shape.head_dim)
            channel_mask = torch.zeros(shape.intermediate_size, device=device)
            channel_mask[list(lp.channels)] = 1.0
            self._handles.append(layer.o_proj.register_forward_pre_hook(_multiply_input(o_mask)))
            self._handles.append(layer.down_proj.register_forward_pre_hook(_multiply_input(channel_mask)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PlanMasks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


def _multiply_input(mask: torch.Tensor):  # type: ignore[no-untyped-def]
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] * mask.to(args[0].dtype), *args[1:])

    return hook


def apply_masks(adapter: ModelAdapter, plan: PruningPlan) -> PlanMasks:
    return PlanMasks(adapter, plan)
