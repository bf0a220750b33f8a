"""Pruning plans: which units every decoder layer keeps, as a JSON-serializable, validated object.

A plan records the original geometry of the model (so it can be checked and replayed without the model),
and per layer the kept query heads, the kept KV heads and the kept MLP channels (original indices).
It also does the accounting: prunable parameters removed, the fraction of the whole model, FLOPs per token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.hipp.errors import PlanError
from worker.hipp.models.adapters.base import LayerShape, ModelAdapter

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelGeometry:
    """What a plan needs to know about the dense model."""

    family: str
    hidden_size: int
    layers: tuple[LayerShape, ...]
    total_parameters: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "total_parameters": self.total_parameters,
            "layers": [asdict(shape) for shape in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelGeometry:
        return cls(
            family=str(data["family"]),
            hidden_size=int(data["hidden_size"]),
            total_parameters=int(data["total_parameters"]),
            layers=tuple(LayerShape(**shape) for shape in data["layers"]),
        )


@dataclass(frozen=True)
class LayerPlan:
    """Units one decoder layer keeps, as sorted original indices."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]

    @classmethod
    def dense(cls, shape: LayerShape) -> LayerPlan:
        return cls(
            tuple(range(shape.num_heads)), tuple(range(shape.num_kv_heads)), tuple(range(shape.intermediate_size))
        )

    def head_order(self, shape: LayerShape) -> list[int]:
        """Kept query heads grouped by kept KV head: the row order of the pruned q_proj."""
        kept = set(self.heads)
        return [
            h
            for g in self.kv_heads
            for h in range(g * shape.group_size, (g + 1) * shape.group_size)
            if h in kept
        ]


# --- parameter and FLOP accounting -------------------------------------------------------------------


def attention_parameters(shape: LayerShape, hidden: int, num_heads: int, num_kv_heads: int) -> int:
    d = shape.head_dim
    q_and_o = 2 * num_heads * d * hidden + (num_heads * d if shape.attention_bias else 0)
    k_and_v = 2 * num_kv_heads * d * hidden + (2 * num_kv_heads * d if shape.attention_bias else 0)
    return q_and_o + k_and_v


def mlp_parameters(shape: LayerShape, hidden: int, channels: int) -> int:
    return 3 * channels * hidden + (2 * channels if shape.mlp_bias else 0)


def layer_parameters(shape: LayerShape, hidden: int, heads: int, kv_heads: int, channels: int) -> int:
    """Prunable parameters of a layer with the given unit counts (o_proj/down_proj biases are not prunable)."""
    return attention_parameters(shape, hidden, heads, kv_heads) + mlp_parameters(shape, hidden, channels)


def dense_layer_parameters(shape: LayerShape, hidden: int) -> int:
    return layer_parameters(shape, hidden, shape.num_heads, shape.num_kv_heads, shape.intermediate_size)


@dataclass
class PruningPlan:
    """A whole-model pruning plan. ``meta`` records how it was made (criterion, allocation, ...)."""

    geometry: ModelGeometry
    layers: list[LayerPlan]
    mlp_multiple: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def dense(cls, geometry: ModelGeometry, mlp_multiple: int = 1) -> PruningPlan:
        return cls(geometry, [LayerPlan.dense(s) for s in geometry.layers], mlp_multiple=mlp_multiple)

    # --- accounting ----------------------------------------------------------------------------------
    def prunable_parameters(self) -> int:
        return sum(dense_layer_parameters(s, self.geometry.hidden_size) for s in self.geometry.layers)

    def kept_parameters_per_layer(self) -> list[int]:
        hidden = self.geometry.hidden_size
        return [
            layer_parameters(s, hidden, len(lp.heads), len(lp.kv_heads), len(lp.channels))
            for s, lp in zip(self.geometry.layers, self.layers, strict=True)
        ]

    def removed_parameters(self) -> int:
        return self.prunable_parameters() - sum(self.kept_parameters_per_layer())

    @property
    def sparsity(self) -> float:
        """Removed / prunable LM-decoder parameters."""
        return self.removed_parameters() / self.prunable_parameters()

    @property
    def model_fraction_removed(self) -> float:
        """Removed parameters as a fraction of the whole VLM."""
        return self.removed_parameters() / self.geometry.total_parameters

    def layer_sparsities(self) -> list[float]:
        hidden = self.geometry.hidden_size
        return [
            1.0 - kept / dense_layer_parameters(s, hidden)
            for s, kept in zip(self.geometry.layers, self.kept_parameters_per_layer(), strict=True)
        ]

    def decoder_flops_per_token(self, context: int = 0) -> int:
        """Multiply-adds x2 of the decoder's linears for one token, plus attention over ``context`` keys."""
        flops = 2 * sum(self.kept_parameters_per_layer())
        for s, lp in zip(self.geometry.layers, self.layers, strict=True):
            flops += 4 * len(lp.heads) * s.head_dim * context
        return flops

    def dense_decoder_flops_per_token(self, context: int = 0) -> int:
        return PruningPlan.dense(self.geometry).decoder_flops_per_token(context)

    def summary(self) -> dict[str, Any]:
        """The plan's figures for people and job results; ``rounding`` (what rounding the MLP widths to
        ``mlp_multiple`` cost, see ``rounding.RoundingCost``) when the planner recorded it."""
        rounding = {"rounding": self.meta["rounding"]} if "rounding" in self.meta else {}
        return {
            "sparsity": self.sparsity,
            "model_fraction_removed": self.model_fraction_removed,
            "removed_parameters": self.removed_parameters(),
            "prunable_parameters": self.prunable_parameters(),
            "total_parameters": self.geometry.total_parameters,
            "flops_per_token": self.decoder_flops_per_token(),
            "dense_flops_per_token": self.dense_decoder_flops_per_token(),
            "layers": [
                {"heads": len(lp.heads), "kv_heads": len(lp.kv_heads), "channels": len(lp.channels),
                 "sparsity": sp}
                for lp, sp in zip(self.layers, self.layer_sparsities(), strict=True)
            ],
            **rounding,
        }

    # --- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`PlanError` naming the first problem found."""
        g = self.geometry
        if len(self.layers) != g.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers, the model has {g.num_layers}")
        if self.mlp_multiple < 1:
            raise PlanError(f"mlp_multiple must be >= 1, got {self.mlp_multiple}")
        for i, (shape, lp) in enumerate(zip(g.layers, self.layers, strict=True)):
            _validate_layer(i, shape, lp, self.mlp_multiple)

    # --- serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "hipp-plan",
            "version": PLAN_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "geometry": self.geometry.to_dict(),
            "mlp_multiple": self.mlp_multiple,
            "summary": self.summary(),
            "meta": self.meta,
            "layers": [
                {"heads": list(lp.heads), "kv_heads": list(lp.kv_heads), "channels": _compress(lp.channels)}
                for lp in self.layers
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=1))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        if data.get("format") != "hipp-plan":
            raise PlanError("not a HiPP plan: the 'format' field must be 'hipp-plan'")
        if int(data.get("version", 0)) > PLAN_FORMAT_VERSION:
            raise PlanError(f"plan version {data['version']} is newer than this engine ({PLAN_FORMAT_VERSION})")
        try:
            plan = cls(
                geometry=ModelGeometry.from_dict(data["geometry"]),
                layers=[
                    LayerPlan(tuple(d["heads"]), tuple(d["kv_heads"]), _expand(d["channels"]))
                    for d in data["layers"]
                ],
                mlp_multiple=int(data.get("mlp_multiple", 1)),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan: {exc}") from None
        plan.validate()
        recorded = data.get("fingerprint")
        if recorded is not None and recorded != plan.fingerprint:
            raise PlanError("plan fingerprint does not match its contents (the file was edited or corrupted)")
        return plan

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_json(Path(path).read_text())

    @property
    def fingerprint(self) -> str:
        """Stable hash of the geometry and the kept units (not of ``meta``)."""
        payload = json.dumps(
            {
                "geometry": self.geometry.to_dict(),
                "mlp_multiple": self.mlp_multiple,
                "layers": [[list(lp.heads), list(lp.kv_heads), list(lp.channels)] for lp in self.layers],
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _validate_layer(i: int, shape: LayerShape, lp: LayerPlan, mlp_multiple: int) -> None:
    where = f"layer {i}"
    _check_indices(f"{where} heads", lp.heads, shape.num_heads)
    _check_indices(f"{where} kv_heads", lp.kv_heads, shape.num_kv_heads)
    _check_indices(f"{where} channels", lp.channels, shape.intermediate_size)
    if not lp.heads:
        raise PlanError(f"{where}: keeps no attention head; keep at least one")
    kept_groups = {h // shape.group_size for h in lp.heads}
    if kept_groups != set(lp.kv_heads):
        raise PlanError(
            f"{where}: kept query heads use KV groups {sorted(kept_groups)} but kept KV heads are "
            f"{list(lp.kv_heads)}; keep exactly the KV heads whose query heads are kept"
        )
    per_group = {sum(1 for h in lp.heads if h // shape.group_size == g) for g in lp.kv_heads}
    if len(per_group) != 1:
        raise PlanError(
            f"{where}: GQA needs the same number of query heads in every kept KV group, got {sorted(per_group)}"
        )
    width = len(lp.channels)
    if width not in (0, shape.intermediate_size) and width % mlp_multiple:
        raise PlanError(f"{where}: keeps {width} MLP channels, not a multiple of {mlp_multiple}")


def _check_indices(what: str, indices: tuple[int, ...], bound: int) -> None:
    if list(indices) != sorted(set(indices)):
        raise PlanError(f"{what} must be sorted and unique")
    if indices and (indices[0] < 0 or indices[-1] >= bound):
        raise PlanError(f"{what} must lie in [0, {bound}), got {indices[0]}..{indices[-1]}")


def _compress(indices: tuple[int, ...]) -> list[list[int]]:
    """Sorted indices as [start, stop) runs: a 11008-wide MLP plan stays small."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _expand(runs: list[list[int]]) -> tuple[int, ...]:
    return tuple(i for start, stop in runs for i in range(start, stop))


def geometry_of(adapter: ModelAdapter) -> ModelGeometry:
    """The dense geometry of the model behind ``adapter``."""
    return ModelGeometry(
        family=adapter.family,
        hidden_size=adapter.hidden_size,
        layers=tuple(adapter.layer_shapes()),
        total_parameters=adapter.total_parameters(),
    )
