"""95% intervals by bootstrap over questions, from the per-question outcomes a metric carries.

The task metrics keep, next to their counts, one bit per question (``per_question``: POPE's label and
"yes" answer, ScienceQA's correct / wrong) packed as base64, so any result file can be resampled later:
an interval on one plan's POPE mean balanced accuracy or ScienceQA accuracy, and a *paired* interval on the
difference of two plans scored on the same questions (both resampled with the same indices, which is what
removes the questions' shared difficulty from the comparison). POPE splits are resampled independently
(their questions are different) and averaged, as the POPE mean is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from worker.hipp.evaluation import bits
from worker.hipp.evaluation.bits import pack_bits

__all__ = ["pack_bits", "unpack_bits", "interval", "paired_difference", "mean_paired_difference", "pope_mean",
           "sqa_accuracy"]

RESAMPLES = 2000
LEVEL = 0.95


def unpack_bits(text: str, n: int) -> torch.Tensor:
    """The ``n`` bits :func:`~worker.hipp.evaluation.bits.pack_bits` wrote, as a bool tensor."""
    return torch.tensor(bits.unpack_bits(text, n), dtype=torch.bool)


def _indices(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (resamples, n), generator=generator)


def _pope_split(metrics: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    q = metrics["per_question"]
    return unpack_bits(q["label"], metrics["n"]), unpack_bits(q["yes"], metrics["n"])


def _balanced_accuracy(label: torch.Tensor, yes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy of each resample (rows of ``idx``)."""
    lab, ans = label[idx].float(), yes[idx].float()
    pos, neg = lab.sum(1), (1 - lab).sum(1)
    recall = (lab * ans).sum(1) / pos.clamp_min(1)
    specificity = ((1 - lab) * (1 - ans)).sum(1) / neg.clamp_min(1)
    return (recall + specificity) / 2


def has_outcomes(metrics: Mapping[str, Any]) -> bool:
    """Whether ``metrics`` (an evaluator's or runner's result) carries per-question outcomes everywhere."""
    parts = [*metrics.get("pope", {}).values()]
    if "scienceqa" in metrics:
        parts.append(metrics["scienceqa"])
    return bool(parts) and all("per_question" in p for p in parts)


Statistic = Callable[[Mapping[str, Any], dict[str, torch.Tensor]], torch.Tensor]


def pope_mean(metrics: Mapping[str, Any], idx: dict[str, torch.Tensor]) -> torch.Tensor:
    splits = metrics["pope"]
    return torch.stack([_balanced_accuracy(*_pope_split(splits[s]), idx[s]) for s in splits]).mean(0)


def sqa_accuracy(metrics: Mapping[str, Any], idx: dict[str, torch.Tensor]) -> torch.Tensor:
    sqa = metrics["scienceqa"]
    correct = unpack_bits(sqa["per_question"]["correct"], sqa["n"]).float()
    return correct[idx["scienceqa"]].mean(1)


def _resample_plan(metrics: Mapping[str, Any], resamples: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    idx = {s: _indices(m["n"], resamples, generator) for s, m in sorted(metrics.get("pope", {}).items())}
    if "scienceqa" in metrics:
        idx["scienceqa"] = _indices(metrics["scienceqa"]["n"], resamples, generator)
    return idx


def _interval(samples: torch.Tensor, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = torch.quantile(samples.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return round(low, 4), round(high, 4)


def interval(metrics: Mapping[str, Any], statistic: Statistic, resamples: int = RESAMPLES, seed: int = 0,
             level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (:func:`pope_mean` or :func:`sqa_accuracy`)."""
    return _interval(statistic(metrics, _resample_plan(metrics, resamples, seed)), level)


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any], statistic: Statistic,
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Interval of ``statistic(a) - statistic(b)`` for two plans scored on the same questions."""
    idx = _resample_plan(a, resamples, seed)
    return _interval(statistic(a, idx) - statistic(b, idx), level)


def mean_paired_difference(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], statistic: Statistic,
                           resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Interval of the mean over ``pairs`` of ``statistic(a) - statistic(b)`` (e.g. an ablation minus the full
    policy, one pair per training seed), every plan scored on the same questions and resampled with the same
    indices."""
    if not pairs:
        raise ValueError("no pairs to compare")
    idx = _resample_plan(pairs[0][0], resamples, seed)
    diffs = torch.stack([statistic(a, idx) - statistic(b, idx) for a, b in pairs]).mean(0)
    return _interval(diffs, level)


def outcomes_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Just what :func:`pope_mean` and :func:`sqa_accuracy` read: counts and per-question bits (for result
    files that keep the outcomes without the other metrics)."""
    out: dict[str, Any] = {"pope": {s: {"n": m["n"], "per_question": m["per_question"]}
                                    for s, m in metrics.get("pope", {}).items()}}
    if "scienceqa" in metrics:
        out["scienceqa"] = {"n": metrics["scienceqa"]["n"], "per_question": metrics["scienceqa"]["per_question"]}
    return out
