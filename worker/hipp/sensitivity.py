"""Visual sensitivity from attention flow: which decoder layers move image information into the text stream.

On a calibration set, with eager attention, for every decoder layer l:

- direct mass ``a_l``: mean over text query positions i (after the image) of the attention mass on image keys,
  ``sum_j A_l[i, j]``, with ``A_l`` averaged over heads; also per head;
- attention rollout (Abnar & Zuidema 2020): ``R_l = rownorm(A_l + I) R_{l-1}``, ``f_l`` the same text-to-image
  mass of ``R_l``; its increment ``f_l - f_{l-1}`` is layer l's contribution to moving vision into language.

Attention maps are consumed layer by layer by forward hooks, so only one ``[batch, seq, seq]`` rollout matrix
is alive at a time; batch and sequence length are capped by the calibration iterator.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.hipp.data.calibration import CalibrationSample, iter_batches
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter


@dataclass
class VisualSensitivity:
    direct: list[float]
    direct_per_head: list[list[float]]
    rollout: list[float]
    increment: list[float]
    samples: int

    @property
    def num_layers(self) -> int:
        return len(self.direct)

    def normalized(self) -> list[float]:
        """One score per layer in [0, 1]: the direct mass and the positive rollout increment, each scaled by
        its maximum over layers, averaged. Used by the sensitivity-aware allocators and the policy state."""
        direct = _scale(self.direct)
        increment = _scale([max(x, 0.0) for x in self.increment])
        return [(a + b) / 2 for a, b in zip(direct, increment, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {"direct": self.direct, "direct_per_head": self.direct_per_head, "rollout": self.rollout,
                "increment": self.increment, "normalized": self.normalized(), "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisualSensitivity:
        return cls(direct=list(data["direct"]), direct_per_head=[list(h) for h in data["direct_per_head"]],
                   rollout=list(data["rollout"]), increment=list(data["increment"]), samples=int(data["samples"]))


def _scale(values: Sequence[float]) -> list[float]:
    top = max((abs(v) for v in values), default=0.0)
    return [v / top if top > 0 else 0.0 for v in values]


def text_query_mask(image_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Real text positions after the first image token: the queries that can see the image."""
    seq = image_mask.shape[1]
    positions = torch.arange(seq, device=image_mask.device).expand_as(image_mask)
    first_image = torch.where(image_mask.any(1), image_mask.float().argmax(1), torch.full_like(positions[:, 0], seq))
    return attention_mask.bool() & ~image_mask & (positions > first_image[:, None])


def image_mass(attn: torch.Tensor, image_mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Per batch element, mean over query positions of the mass on image keys. ``attn``: [B, ..., S, S]."""
    mass = (attn * image_mask[:, None, :].to(attn.dtype) if attn.dim() == 3 else
            attn * image_mask[:, None, None, :].to(attn.dtype)).sum(-1)  # [B, (H,) S]
    q = queries.to(attn.dtype)
    if attn.dim() == 4:
        q = q[:, None, :]
    return (mass * q).sum(-1) / q.sum(-1).clamp_min(1.0)


def rollout_step(previous: torch.Tensor, attn_mean: torch.Tensor) -> torch.Tensor:
    """``rownorm(A + I) @ R_{l-1}`` for a batch of [S, S] matrices."""
    eye = torch.eye(attn_mean.shape[-1], dtype=attn_mean.dtype, device=attn_mean.device)
    step = attn_mean + eye
    step = step / step.sum(-1, keepdim=True)
    return step @ previous


@torch.no_grad()
def compute_visual_sensitivity(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    batch_size: int = 4,
    max_length: int | None = 1024,
    reporter: Reporter = SILENT,
) -> VisualSensitivity:
    """Direct and rollout text-to-image attention mass per decoder layer (and per head) on ``samples``."""
    model: Any = loaded.model
    adapter = loaded.adapter
    layers = adapter.layers()
    num_layers = len(layers)
    direct = torch.zeros(num_layers, dtype=torch.float64)
    per_head = [torch.zeros(layer.num_heads, dtype=torch.float64) for layer in layers]
    rollout = torch.zeros(num_layers, dtype=torch.float64)
    state: dict[str, Any] = {}

    def on_attention(index: int, weights: torch.Tensor) -> None:
        weights = weights.double()
        image, queries = state["image"], state["queries"]
        per_head[index] += image_mass(weights, image, queries).sum(0).cpu()
        mean = weights.mean(1)
        direct[index] += image_mass(mean, image, queries).sum().cpu()
        state["rollout"] = rollout_step(state["rollout"], mean)
        state["calls"] += 1
        rollout[index] += image_mass(state["rollout"], image, queries).sum().cpu()

    handles = [
        layer.attention.register_forward_hook(
            lambda _m, _args, output, i=i: on_attention(i, output[1]) if output[1] is not None else None)
        for i, layer in enumerate(layers)
    ]
    previous_impl = _attention_implementation(model)
    model.set_attn_implementation("eager")
    total = 0
    try:
        batches = list(iter_batches(loaded, samples, batch_size, max_length))
        for batch in reporter.track(batches, message="attention flow"):
            image = adapter.image_token_mask(batch)
            state["image"] = image
            state["queries"] = text_query_mask(image, batch["attention_mask"])
            seq = batch["input_ids"].shape[1]
            state["rollout"] = torch.eye(seq, dtype=torch.float64, device=image.device).expand(
                image.shape[0], seq, seq).clone()
            state["calls"] = 0
            model(**batch, output_attentions=True)
            if state["calls"] != num_layers:
                raise RuntimeError("attention weights were not returned by every decoder layer")
            total += image.shape[0]
    finally:
        for h in handles:
            h.remove()
        if previous_impl is not None:
            model.set_attn_implementation(previous_impl)
    direct_l = (direct / total).tolist()
    rollout_l = (rollout / total).tolist()
    increment = [rollout_l[0]] + [rollout_l[i] - rollout_l[i - 1] for i in range(1, num_layers)]
    return VisualSensitivity(direct=direct_l, direct_per_head=[(h / total).tolist() for h in per_head],
                             rollout=rollout_l, increment=increment, samples=total)


def _attention_implementation(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def calibration_fingerprint(reference: str, samples: Sequence[CalibrationSample], extra: str = "") -> str:
    digest = hashlib.sha256(reference.encode() + extra.encode())
    for s in samples:
        digest.update(s.question.encode())
        digest.update(s.image.tobytes())
    return digest.hexdigest()[:16]


def cached_visual_sensitivity(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    cache_dir: Path | None,
    batch_size: int = 4,
    max_length: int | None = 1024,
    reporter: Reporter = SILENT,
) -> VisualSensitivity:
    """:func:`compute_visual_sensitivity`, cached on disk by model reference and calibration fingerprint."""
    if cache_dir is None:
        return compute_visual_sensitivity(loaded, samples, batch_size, max_length, reporter)
    key = calibration_fingerprint(loaded.reference, samples, f"{batch_size}:{max_length}")
    path = cache_dir / f"sensitivity-{key}.json"
    if path.is_file():
        return VisualSensitivity.from_dict(json.loads(path.read_text()))
    result = compute_visual_sensitivity(loaded, samples, batch_size, max_length, reporter)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict()))
    return result


