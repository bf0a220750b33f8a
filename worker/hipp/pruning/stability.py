"""SynFlow-inspired stability proxy: how much synaptic path mass a plan keeps in every layer.

SynFlow (Tanaka et al. 2020) scores parameters by the data-free path mass ``1^T (prod_l |W_l|) 1`` to avoid
layer collapse. Per structured unit of a transformer layer:

- MLP channel k: ``(sum|W_up[k,:]| + sum|W_gate[k,:]|) * sum|W_down[:,k]|``;
- query head h: ``sum|W_v[g(h) block]| * sum|W_o[:, h block]|`` (its KV group's value rows, its output columns).

A plan keeps ``rho_attn`` of the head mass and ``rho_mlp`` of the channel mass of each layer;
``rho_l = sqrt(rho_attn * rho_mlp)`` collapses to 0 when either block is emptied. ``S`` is the geometric mean
of ``rho_l`` over layers; the pre-screen rejects plans whose smallest ``rho_l`` is below a threshold without
evaluating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker.hipp.models.adapters.base import LayerAdapter, ModelAdapter
from worker.hipp.pruning.plan import PruningPlan

DEFAULT_PRESCREEN = 0.05


@dataclass
class LayerPathMass:
    heads: torch.Tensor
    channels: torch.Tensor

    @property
    def total(self) -> float:
        return float(self.heads.sum() + self.channels.sum())


@dataclass
class StabilityReport:
    rho: list[float]
    score: float
    min_rho: float
    passes: bool


def layer_path_mass(layer: LayerAdapter) -> LayerPathMass:
    d = layer.head_dim
    with torch.no_grad():
        v_rows = layer.v_proj.weight.detach().abs().double().sum(1).view(layer.num_kv_heads, d).sum(1)
        o_cols = layer.o_proj.weight.detach().abs().double().sum(0).view(layer.num_heads, d).sum(1)
        group = layer.num_heads // layer.num_kv_heads
        heads = v_rows.repeat_interleave(group) * o_cols
        producers = sum(lin.weight.detach().abs().double().sum(1) for lin in layer.mlp_producers())
        consumer = layer.down_proj.weight.detach().abs().double().sum(0)
        channels = torch.as_tensor(producers) * consumer
    return LayerPathMass(heads=heads.cpu(), channels=channels.cpu())


class StabilityProxy:
    """Path masses of the dense model, computed once; evaluates any plan for that model in microseconds."""

    def __init__(self, masses: list[LayerPathMass], threshold: float = DEFAULT_PRESCREEN) -> None:
        self.masses = masses
        self.threshold = threshold

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter, threshold: float = DEFAULT_PRESCREEN) -> StabilityProxy:
        return cls([layer_path_mass(layer) for layer in adapter.layers()], threshold)

    def layer_mass(self) -> list[float]:
        """Dense path mass per layer (a policy-state feature)."""
        return [m.total for m in self.masses]

    def retained(self, plan: PruningPlan) -> list[float]:
        rho = []
        for mass, lp in zip(self.masses, plan.layers, strict=True):
            attn = float(mass.heads[list(lp.heads)].sum() / mass.heads.sum()) if lp.heads else 0.0
            total_mlp = float(mass.channels.sum())
            mlp = float(mass.channels[list(lp.channels)].sum()) / total_mlp if total_mlp > 0 else 1.0
            rho.append(math.sqrt(max(attn, 0.0) * max(mlp, 0.0)))
        return rho

    def evaluate(self, plan: PruningPlan) -> StabilityReport:
        rho = self.retained(plan)
        floor = 1e-6
        score = math.exp(sum(math.log(max(r, floor)) for r in rho) / len(rho))
        smallest = min(rho)
        return StabilityReport(rho=rho, score=score, min_rho=smallest, passes=smallest >= self.threshold)
