"""The policy state: one typed, normalized feature vector per decoder layer, computed once per model.

Features (method.md "State"): normalized depth; share of prunable parameters; statistics of unit importance
(Wanda-sp and magnitude: mean and coefficient of variation); calibration activation norms of the head and MLP
consumers; SynFlow path mass; the attention-flow visual sensitivity (direct mass and rollout increment).
Scale-dependent features are log-transformed and standardized across layers, so a policy sees the shape of a
model rather than its absolute magnitudes and can transfer between models of different depth and width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.criteria import MagnitudeCriterion, WandaSPCriterion
from worker.hipp.pruning.plan import dense_layer_parameters, geometry_of
from worker.hipp.pruning.stability import StabilityProxy
from worker.hipp.sensitivity import VisualSensitivity, compute_visual_sensitivity

FEATURES = (
    "depth", "param_share", "wanda_mean", "wanda_cv", "magnitude_mean", "magnitude_cv",
    "act_norm_attn", "act_norm_mlp", "path_mass", "visual_direct", "visual_increment",
)
# Features that carry the visual signal (dropped together in the no-sensitivity ablation).
VISUAL_FEATURES = ("visual_direct", "visual_increment")


@dataclass
class PolicyState:
    features: torch.Tensor  # [layers, len(FEATURES)]
    names: tuple[str, ...]
    sensitivity: VisualSensitivity

    @property
    def num_layers(self) -> int:
        return int(self.features.shape[0])

    def without(self, names: Sequence[str]) -> PolicyState:
        """The same state with ``names`` zeroed (ablations keep the input width fixed)."""
        features = self.features.clone()
        for name in names:
            features[:, self.names.index(name)] = 0.0
        return PolicyState(features, self.names, self.sensitivity)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "features": self.features.tolist(),
                "sensitivity": self.sensitivity.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyState:
        return cls(torch.tensor(data["features"], dtype=torch.float32), tuple(data["names"]),
                   VisualSensitivity.from_dict(data["sensitivity"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> PolicyState:
        return cls.from_dict(json.loads(path.read_text()))


def standardize(values: Sequence[float], log: bool = True) -> list[float]:
    xs = [math.log(max(v, 1e-12)) if log else v for v in values]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return [(x - mean) / std if std > 1e-9 else 0.0 for x in xs]


def _cv(t: torch.Tensor) -> float:
    t = t.double()
    return float(t.std() / t.mean().clamp_min(1e-12)) if t.numel() > 1 else 0.0


def compute_policy_state(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    batch_size: int = 8,
    max_length: int | None = 1024,
    reporter: Reporter = SILENT,
    sensitivity: VisualSensitivity | None = None,
) -> PolicyState:
    """Compute every feature for ``loaded`` (one calibration pass and one attention-flow pass)."""
    from worker.hipp.data.calibration import collect_activations

    geometry = geometry_of(loaded.adapter)
    layers = loaded.adapter.layers()
    n = len(layers)
    reporter.stage("calibrate", "activation statistics")
    activations = collect_activations(loaded, samples, batch_size, max_length, reporter)
    if sensitivity is None:
        reporter.stage("sensitivity", "attention flow")
        sensitivity = compute_visual_sensitivity(loaded, samples, batch_size, max_length, reporter)
    wanda = [WandaSPCriterion().score_layer(layer, act) for layer, act in zip(layers, activations, strict=True)]
    magnitude = [MagnitudeCriterion().score_layer(layer, None) for layer in layers]
    path_mass = StabilityProxy.from_adapter(loaded.adapter).layer_mass()
    sizes = [dense_layer_parameters(s, geometry.hidden_size) for s in geometry.layers]

    def unit_mean(scores: Any) -> float:
        return float(torch.cat([scores.heads.double(), scores.channels.double()]).mean())

    columns = {
        "depth": [i / max(n - 1, 1) for i in range(n)],
        "param_share": [n * s / sum(sizes) for s in sizes],
        "wanda_mean": standardize([unit_mean(s) for s in wanda]),
        "wanda_cv": standardize([_cv(s.channels) for s in wanda], log=False),
        "magnitude_mean": standardize([unit_mean(s) for s in magnitude]),
        "magnitude_cv": standardize([_cv(s.channels) for s in magnitude], log=False),
        "act_norm_attn": standardize([float(a.o_proj_norm.mean()) for a in activations]),
        "act_norm_mlp": standardize([float(a.down_proj_norm.mean()) for a in activations]),
        "path_mass": standardize(path_mass),
        "visual_direct": _scaled(sensitivity.direct),
        "visual_increment": _scaled(sensitivity.increment),
    }
    features = torch.tensor([[columns[name][i] for name in FEATURES] for i in range(n)], dtype=torch.float32)
    return PolicyState(features, FEATURES, sensitivity)


def _scaled(values: Sequence[float]) -> list[float]:
    top = max(abs(v) for v in values) or 1.0
    return [v / top for v in values]
