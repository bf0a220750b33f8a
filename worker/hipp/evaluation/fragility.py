"""Per-layer fragility: what removing a small, fixed piece of one decoder layer alone costs on POPE and ScienceQA.

For every decoder layer on its own, two perturbations are applied (by surgery, to a fresh copy of the model):

- ``heads``: one query head per KV group removed (the least important head of each group by the criterion);
  KV heads and MLP stay dense. This is the smallest GQA-valid cut of a layer's attention.
- ``mlp``: 25% of the layer's MLP channels removed (the least important by the criterion); attention stays dense.

The model is then scored with the evaluation runner (logit scoring, the same prompts as every report), and each
perturbation's POPE mean balanced accuracy, POPE yes-ratio and ScienceQA accuracy are compared with the dense
model's on the same questions. Drops are paired: the standard error comes from per-question differences (a
question answered right by both models adds no variance). POPE questions asked in several splits (the positive
ones are shared) are merged, so they are not counted as independent evidence twice. Variances are pooled
within each label class: POPE fixes its yes/no balance by design, so the yes-ratio's uncertainty is that of the
model's answers given the labels (a model that answers every question right has a yes-ratio with zero SE).

Which plans a reader should compare this with: a plan that keeps a fragile layer dense "protects" it.

Lives in the evaluation room: imports models, data, pruning and the evaluation runner; the caller chooses the
calibration samples (``calibration_source``) and the questions.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.errors import OptionError
from worker.hipp.evaluation.plan_evaluator import EvalSet
from worker.hipp.evaluation.runner import ImageCache, evaluate_pope_split, evaluate_sqa
from worker.hipp.models.adapters import get_adapter
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import LayerCounts
from worker.hipp.pruning.plan import PruningPlan, geometry_of
from worker.hipp.pruning.planner import plan_from_counts, score_model
from worker.hipp.pruning.surgery import apply_plan

#: The engine's default criterion (``build_plan``, ``hipp prune``): the units removed are its least important.
DEFAULT_CRITERION = "wanda-sp"
MLP_FRACTION = 0.25
PERTURBATIONS = ("heads", "mlp")
#: Two-sided 95% normal interval.
Z95 = 1.96


# ------------------------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error; ``low``/``high`` bound the 95% interval."""

    value: float
    se: float

    @property
    def low(self) -> float:
        return self.value - Z95 * self.se

    @property
    def high(self) -> float:
        return self.value + Z95 * self.se

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "se": self.se, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Term:
    """One question's part in a linear statistic: its ``value`` counts with ``weight``. ``key`` identifies the
    question (equal keys are the same question, merged); ``stratum`` is the class its variance is pooled in."""

    key: Hashable
    stratum: Hashable
    weight: float
    value: float


def linear_estimate(terms: Iterable[Term]) -> Estimate:
    """``sum(weight * value)`` over questions, with the plug-in (binomial for 0/1 values) standard error
    ``sqrt(sum_q w_q^2 var(stratum of q))``; repeated questions are merged into one with their weights summed."""
    merged: dict[Hashable, Term] = {}
    for t in terms:
        seen = merged.get(t.key)
        merged[t.key] = t if seen is None else Term(t.key, t.stratum, seen.weight + t.weight, t.value)
    by_stratum: dict[Hashable, list[Term]] = defaultdict(list)
    for t in merged.values():
        by_stratum[t.stratum].append(t)
    value = sum(t.weight * t.value for t in merged.values())
    variance = 0.0
    for members in by_stratum.values():
        mean = sum(t.value for t in members) / len(members)
        spread = sum((t.value - mean) ** 2 for t in members) / len(members)
        variance += spread * sum(t.weight**2 for t in members)
    return Estimate(value, math.sqrt(variance))


# --------------------------------------------------------------------------------------------- answers


@dataclass
class Answers:
    """Per-question outcomes of one model on an :class:`EvalSet` (same order as the set)."""

    pope_yes: dict[str, list[bool]]
    sqa_correct: list[bool]
    metrics: dict[str, Any] = field(default_factory=dict)


def answer_evalset(model: Any, processor: Any, evalset: EvalSet, batch_size: int = 32,
                   images: ImageCache | None = None, reporter: Reporter = SILENT) -> Answers:
    """Score ``model`` on every question of ``evalset`` with the evaluation runner (logit mode)."""
    load = images or ImageCache(size=4096)
    model.eval()
    pope_yes: dict[str, list[bool]] = {}
    metrics: dict[str, Any] = {"pope": {}}
    for split, questions in evalset.pope.items():
        result = evaluate_pope_split(model, processor, questions, "logits", batch_size, load, reporter)
        pope_yes[split] = [p == "yes" for p in result.predictions]
        metrics["pope"][split] = result.metrics.to_dict()
    sqa_correct: list[bool] = []
    if evalset.sqa:
        sqa = evaluate_sqa(model, processor, evalset.sqa, "logits", batch_size, load, reporter)
        sqa_correct = [p == problem.answer for p, problem in zip(sqa.predictions, evalset.sqa, strict=True)]
        metrics["scienceqa"] = sqa.metrics.to_dict()
    return Answers(pope_yes, sqa_correct, metrics)


def _pope_key(split: str, evalset: EvalSet, i: int) -> tuple[str, str, str]:
    q = evalset.pope[split][i]
    return (q.image, q.text, q.label)


def pope_bacc_terms(evalset: EvalSet, correct: dict[str, list[float]]) -> list[Term]:
    """Terms of the mean over splits of POPE balanced accuracy: within a split, each label class weighs half."""
    terms = []
    for split, questions in evalset.pope.items():
        per_label = {label: sum(q.label == label for q in questions) for label in ("yes", "no")}
        for i, q in enumerate(questions):
            weight = 1.0 / (len(evalset.pope) * 2 * per_label[q.label])
            terms.append(Term(_pope_key(split, evalset, i), q.label, weight, correct[split][i]))
    return terms


def pope_yes_terms(evalset: EvalSet, yes: dict[str, list[float]]) -> list[Term]:
    """Terms of the mean over splits of the POPE yes-ratio (variance pooled within each label class)."""
    return [Term(_pope_key(split, evalset, i), q.label, 1.0 / (len(evalset.pope) * len(questions)), yes[split][i])
            for split, questions in evalset.pope.items() for i, q in enumerate(questions)]


def sqa_terms(evalset: EvalSet, values: Sequence[float]) -> list[Term]:
    return [Term(p.pid, "sqa", 1.0 / len(values), v) for p, v in zip(evalset.sqa, values, strict=True)]


def _pope_correct(evalset: EvalSet, answers: Answers) -> dict[str, list[float]]:
    return {split: [float(y == (q.label == "yes")) for y, q in zip(answers.pope_yes[split], qs, strict=True)]
            for split, qs in evalset.pope.items()}


def _yes(answers: Answers) -> dict[str, list[float]]:
    return {split: [float(y) for y in ys] for split, ys in answers.pope_yes.items()}


def summarize(evalset: EvalSet, answers: Answers) -> dict[str, Estimate]:
    """POPE mean balanced accuracy, POPE mean yes-ratio and ScienceQA accuracy, each with its standard error."""
    out = {}
    if evalset.pope:
        out["pope_bacc"] = linear_estimate(pope_bacc_terms(evalset, _pope_correct(evalset, answers)))
        out["pope_yes"] = linear_estimate(pope_yes_terms(evalset, _yes(answers)))
    if evalset.sqa:
        out["sqa"] = linear_estimate(sqa_terms(evalset, [float(c) for c in answers.sqa_correct]))
    return out


def paired_drops(evalset: EvalSet, dense: Answers, pruned: Answers) -> dict[str, Estimate]:
    """dense - pruned for POPE mean balanced accuracy and ScienceQA accuracy (positive = worse), paired per
    question; and pruned - dense for the yes-ratio (positive = says yes more often)."""
    out = {}
    if evalset.pope:
        before, after = _pope_correct(evalset, dense), _pope_correct(evalset, pruned)
        diff = {s: [a - b for a, b in zip(before[s], after[s], strict=True)] for s in before}
        out["pope_bacc_drop"] = linear_estimate(pope_bacc_terms(evalset, diff))
        yes_before, yes_after = _yes(dense), _yes(pruned)
        shift = {s: [b - a for a, b in zip(yes_before[s], yes_after[s], strict=True)] for s in yes_before}
        out["pope_yes_shift"] = linear_estimate(pope_yes_terms(evalset, shift))
    if evalset.sqa:
        diff_sqa = [float(a) - float(b) for a, b in zip(dense.sqa_correct, pruned.sqa_correct, strict=True)]
        out["sqa_drop"] = linear_estimate(sqa_terms(evalset, diff_sqa))
    return out


# ----------------------------------------------------------------------------------------------- plans


def dense_counts(loaded: LoadedModel) -> list[LayerCounts]:
    return [LayerCounts(s.num_kv_heads, s.group_size, s.intermediate_size) for s in geometry_of(loaded.adapter).layers]


def perturbation_counts(loaded: LoadedModel, layer: int, perturbation: str) -> list[LayerCounts]:
    """Per-layer counts: dense everywhere except ``layer``, which loses one query head per KV group (``heads``)
    or 25% of its MLP channels (``mlp``)."""
    counts = dense_counts(loaded)
    c = counts[layer]
    shape = geometry_of(loaded.adapter).layers[layer]
    if perturbation == "heads":
        if shape.group_size < 2:
            raise OptionError(f"layer {layer} has one query head per KV group; removing one would empty the layer")
        counts[layer] = LayerCounts(c.kv_heads, c.heads_per_group - 1, c.channels)
    elif perturbation == "mlp":
        counts[layer] = LayerCounts(c.kv_heads, c.heads_per_group, c.channels - round(MLP_FRACTION * c.channels))
    else:
        raise OptionError(f"unknown perturbation {perturbation!r}; use one of {', '.join(PERTURBATIONS)}")
    return counts


def perturbation_plan(loaded: LoadedModel, scores: Sequence[LayerScores], layer: int, perturbation: str,
                      criterion: str = DEFAULT_CRITERION) -> PruningPlan:
    """The plan of one perturbation; the removed units are the least important by ``scores``."""
    meta = {"model": loaded.reference, "criterion": criterion, "allocation": f"fragility/{perturbation}",
            "layer": layer}
    return plan_from_counts(loaded, perturbation_counts(loaded, layer, perturbation), scores, meta=meta)


def removed_units(plan: PruningPlan, layer: int) -> dict[str, list[int]]:
    """Original indices of the query heads and MLP channels ``plan`` removes from ``layer``."""
    shape, kept = plan.geometry.layers[layer], plan.layers[layer]
    return {"heads": sorted(set(range(shape.num_heads)) - set(kept.heads)),
            "channels": sorted(set(range(shape.intermediate_size)) - set(kept.channels))}


def pruned_copy(loaded: LoadedModel, plan: PruningPlan) -> Any:
    """A deep copy of the model, sliced to ``plan`` (the loaded model stays dense)."""
    model = copy.deepcopy(loaded.model)
    apply_plan(get_adapter(model), plan)
    return model


# --------------------------------------------------------------------------------------------- driver


@dataclass
class FragilityRow:
    layer: int
    perturbation: str
    removed: dict[str, list[int]]
    sparsity: float
    metrics: dict[str, Estimate]
    drops: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "perturbation": self.perturbation, "removed": self.removed,
                "sparsity": self.sparsity, **{k: v.to_dict() for k, v in {**self.metrics, **self.drops}.items()}}


@dataclass
class FragilityResult:
    criterion: str
    #: The dense model's geometry (``ModelGeometry.to_dict``): a plan is shown next to this table only if it
    #: was made for the same shapes.
    geometry: dict[str, Any]
    dense: dict[str, Estimate]
    rows: list[FragilityRow]
    questions: dict[str, int]

    def row(self, layer: int, perturbation: str) -> FragilityRow:
        return next(r for r in self.rows if r.layer == layer and r.perturbation == perturbation)

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "geometry": self.geometry, "mlp_fraction": MLP_FRACTION,
                "questions": self.questions, "dense": {k: v.to_dict() for k, v in self.dense.items()},
                "rows": [r.to_dict() for r in self.rows]}


def fragility(
    loaded: LoadedModel,
    evalset: EvalSet,
    samples: Sequence[CalibrationSample],
    criterion: str = DEFAULT_CRITERION,
    layers: Sequence[int] | None = None,
    perturbations: Sequence[str] = PERTURBATIONS,
    batch_size: int = 32,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> FragilityResult:
    """For each layer alone (all by default) and each perturbation, the metrics and paired drops vs dense."""
    scoring = score_model(loaded, criterion, samples, seed=seed, reporter=reporter)
    images = ImageCache(size=4096)
    reporter.stage("dense", f"{evalset.size()} questions")
    dense = answer_evalset(loaded.model, loaded.processor, evalset, batch_size, images)
    todo = [(i, p) for i in (layers if layers is not None else range(len(scoring.scores))) for p in perturbations]
    rows = []
    reporter.stage("perturb", f"{len(todo)} single-layer plans")
    for layer, perturbation in reporter.track(todo, message="plans"):
        plan = perturbation_plan(loaded, scoring.scores, layer, perturbation, criterion)
        answers = answer_evalset(pruned_copy(loaded, plan), loaded.processor, evalset, batch_size, images)
        rows.append(FragilityRow(layer, perturbation, removed_units(plan, layer), plan.sparsity,
                                 summarize(evalset, answers), paired_drops(evalset, dense, answers)))
    questions = {**{f"pope_{s}": len(q) for s, q in evalset.pope.items()}, "sqa": len(evalset.sqa)}
    geometry = geometry_of(loaded.adapter).to_dict()
    return FragilityResult(criterion, geometry, summarize(evalset, dense), rows, questions)
