"""The plan evaluator: model + plan + evaluation subsets -> the objectives U, H, C, S and the raw metrics.

Plans are applied with masks (no weight copies), the model inputs are built once and reused for every plan,
answers are scored from first-token logits through the runner's logits path and the tasks' own answer rules
and metrics (Yes vs No for POPE, the best option letter for ScienceQA), and metrics are cached by plan
fingerprint. Objectives are normalized against the dense model:

- U = ScienceQA accuracy / dense accuracy
- H = (mean POPE balanced accuracy - 0.5) / (dense balanced accuracy - 0.5)
- C = achieved sparsity / s_max, or 1 - |s - s*| / s* in matched-sparsity mode (the :class:`ScoringMode`,
  given per call; the evaluator's own mode is the default)
- S = the SynFlow stability proxy (plans failing its pre-screen are not evaluated and get ``PRESCREEN_RETURN``)

A plan that comes with a :class:`~worker.hipp.pruning.bias_compensation.BiasCompensation` (FLAP) is scored with
the removed o_proj / down_proj input channels replaced by their calibration means instead of zeroed: the
function the compensated, sliced model computes (``mean_replacement``; tests/test_flap.py checks it against
surgery). Its metrics are cached under the plan's fingerprint plus a compensation tag.

The evaluator holds no state that callers change: its prepared inputs, dense metrics and cache depend only on
the model and the evaluation set.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.hipp.errors import OptionError
from worker.hipp.evaluation.runner import (
    ImageCache,
    Query,
    answer_ids,
    model_family,
    model_inputs,
    pope_predictions,
    sqa_predictions,
    subset,
)
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.pope import PopeQuestion
from worker.hipp.evaluation.tasks.scienceqa import SqaProblem
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.bias_compensation import BiasCompensation, mean_replacement
from worker.hipp.pruning.masking import apply_masks
from worker.hipp.pruning.plan import PruningPlan, geometry_of
from worker.hipp.pruning.stability import StabilityProxy

PRESCREEN_RETURN = -1.0
COMPENSATED = "bias-compensation"  # cache-key tag of plans scored with FLAP's bias compensation


@dataclass
class EvalSet:
    """Questions used to score plans: POPE per split and ScienceQA problems."""

    pope: dict[str, list[PopeQuestion]]
    sqa: list[SqaProblem]

    @classmethod
    def from_dirs(cls, pope_dir: str | Path | None, sqa_dir: str | Path | None, sqa_split: str = "val",
                  limit: int | None = None, seed: int = 0) -> EvalSet:
        pope_sets = {k: list(subset(v, limit, seed)) for k, v in pope.load_pope(pope_dir).items()} if pope_dir else {}
        sqa = list(subset(scienceqa.load_scienceqa(sqa_dir, sqa_split), limit, seed)) if sqa_dir else []
        if not pope_sets and not sqa:
            raise OptionError("the evaluation set is empty: give a POPE folder, a ScienceQA folder, or both")
        return cls(pope_sets, sqa)

    def size(self) -> int:
        return sum(len(v) for v in self.pope.values()) + len(self.sqa)

    def fingerprint(self) -> str:
        """Digest of the questions, their answers and their images (a file's bytes, not its path): the same set
        rebuilt in another process or on another machine has the same fingerprint."""
        images: dict[str, str] = {}

        def image(ref: str) -> str:
            if ref not in images:
                path = Path(ref)
                images[ref] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ref
            return images[ref]

        records: list[Any] = [
            [split, [[q.question_id, q.text, q.label, image(q.image)] for q in qs]]
            for split, qs in sorted(self.pope.items())]
        records.append([[p.pid, p.question, list(p.choices), p.answer, p.hint, p.kind, image(p.image)]
                        for p in self.sqa])
        return hashlib.sha256(json.dumps(records, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ScoringMode:
    """How compression is scored: against ``s_max``, or, with a ``target_sparsity``, by closeness to it."""

    s_max: float = 0.6
    target_sparsity: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.s_max < 1:
            raise OptionError(f"s_max must be in (0, 1), got {self.s_max}")

    def compression(self, sparsity: float) -> float:
        if self.target_sparsity:
            return 1.0 - abs(sparsity - self.target_sparsity) / self.target_sparsity
        return sparsity / self.s_max


@dataclass
class Objectives:
    utility: float
    robustness: float
    compression: float
    stability: float

    def as_vector(self) -> list[float]:
        return [self.utility, self.robustness, self.compression]


@dataclass
class PlanEvaluation:
    fingerprint: str
    sparsity: float
    objectives: Objectives
    metrics: dict[str, Any]
    seconds: float
    prescreened: bool = False
    cached: bool = False
    rho: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEvaluation:
        data = dict(data)
        data["objectives"] = Objectives(**data["objectives"])
        return cls(**data)


@dataclass
class _Batch:
    """Decoder inputs of one batch, captured once: the vision tower and projector do not depend on the plan,
    so every plan evaluation runs only the language model on these."""

    decoder_kwargs: dict[str, Any]
    rows: list[int]


class _Captured(Exception):
    pass


class PlanEvaluator:
    """Scores plans of one model on one evaluation set. Build once, call :meth:`evaluate` many times.

    ``s_max`` and ``target_sparsity`` set the default :class:`ScoringMode`; a call may pass its own.
    ``load_image`` reads the evaluation images while the inputs are prepared (by default a cache of its own,
    dropped once they are).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        evalset: EvalSet,
        s_max: float = 0.6,
        target_sparsity: float | None = None,
        batch_size: int = 64,
        cache_path: Path | None = None,
        reporter: Reporter = SILENT,
        load_image: Callable[[str], Image.Image] | None = None,
    ) -> None:
        self.mode = ScoringMode(s_max, target_sparsity)
        self.batch_size = batch_size
        self.loaded = loaded
        self.evalset = evalset
        self.stability = StabilityProxy.from_adapter(loaded.adapter)
        self.geometry = geometry_of(loaded.adapter)
        self.cache_path = cache_path
        self._cache: dict[str, PlanEvaluation] = self._read_cache()
        self.evaluations = 0
        self.seconds = 0.0
        reporter.stage("prepare", f"{evalset.size()} evaluation questions")
        load = load_image or ImageCache(size=4096)
        self._pope_batches = {split: self._prepare([Query(load(q.image), pope.prompt_text(q.text)) for q in qs],
                                                   batch_size) for split, qs in evalset.pope.items()}
        self._sqa_batches = self._prepare([Query(load(p.image), scienceqa.prompt_text(p.question, p.choices, p.hint))
                                           for p in evalset.sqa], batch_size)
        self._pope_ids = answer_ids(loaded.processor, pope.ANSWER_WORDS, required=True) if evalset.pope else []
        self._sqa_ids = answer_ids(loaded.processor, scienceqa.ANSWER_WORDS)
        reporter.stage("dense", "metrics of the dense model")
        self.dense_metrics = self._metrics(None)

    # --- preparation ---------------------------------------------------------------------------------
    def _prepare(self, queries: Sequence[Query], batch_size: int) -> list[_Batch]:
        family = model_family(self.loaded.model)
        batches = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            inputs = model_inputs(self.loaded.model, self.loaded.processor, chunk, family)
            inputs = self.loaded.adapter.prepare_inputs({k: v for k, v in inputs.items()
                                                         if isinstance(v, torch.Tensor)})
            batches.append(_Batch(self._capture_decoder_kwargs(inputs), list(range(start, start + len(chunk)))))
        return batches

    @torch.no_grad()
    def _capture_decoder_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Run the model up to its language model and keep what the language model is called with."""
        captured: dict[str, Any] = {}

        def grab(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                raise RuntimeError("the language model was called with positional arguments")
            captured.update({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
            raise _Captured

        handle = self.loaded.adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.loaded.model(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        captured["use_cache"] = False
        return captured

    # --- scoring ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _last_logits(self, batches: Sequence[_Batch]) -> torch.Tensor:
        language_model = self.loaded.adapter.language_model
        model: Any = self.loaded.model
        head = model.get_output_embeddings()
        rows = []
        for b in batches:
            hidden = language_model(**b.decoder_kwargs).last_hidden_state[:, -1]
            rows.append(head(hidden).float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 0)

    def _metrics(self, plan: PruningPlan | None, compensation: BiasCompensation | None = None) -> dict[str, Any]:
        if plan is not None and compensation is not None:
            compensation.check(plan)
            with mean_replacement(self.loaded.adapter, plan, compensation):
                return self._scores()
        masks = apply_masks(self.loaded.adapter, plan) if plan is not None else None
        try:
            return self._scores()
        finally:
            if masks is not None:
                masks.remove()

    def _scores(self) -> dict[str, Any]:
        """Task metrics of the model as it computes now (masks or mean replacement already in place)."""
        result: dict[str, Any] = {"pope": {}}
        for split, batches in self._pope_batches.items():
            predictions = pope_predictions(self._last_logits(batches), self._pope_ids)
            labels = [q.label for q in self.evalset.pope[split]]
            result["pope"][split] = pope.compute_metrics(predictions, labels).to_dict()
        if self._sqa_batches:
            picks = sqa_predictions(self._last_logits(self._sqa_batches), self._sqa_ids, self.evalset.sqa)
            result["scienceqa"] = scienceqa.compute_metrics(picks, self.evalset.sqa).to_dict()
        return result

    # --- objectives ------------------------------------------------------------------------------------
    @staticmethod
    def pope_balanced_accuracy(metrics: dict[str, Any]) -> float:
        splits = metrics.get("pope", {})
        if not splits:
            return math.nan
        return sum(m["balanced_accuracy"] for m in splits.values()) / len(splits)

    def objectives(self, metrics: dict[str, Any], sparsity: float, stability: float,
                   mode: ScoringMode | None = None) -> Objectives:
        """U, H, C, S of a plan's ``metrics``, compression scored in ``mode`` (default: the evaluator's)."""
        dense_sqa = self.dense_metrics.get("scienceqa", {}).get("accuracy", math.nan)
        sqa = metrics.get("scienceqa", {}).get("accuracy", math.nan)
        utility = sqa / dense_sqa if dense_sqa and not math.isnan(sqa) else 0.0
        dense_bal = self.pope_balanced_accuracy(self.dense_metrics)
        bal = self.pope_balanced_accuracy(metrics)
        robustness = (bal - 0.5) / (dense_bal - 0.5) if dense_bal > 0.5 and not math.isnan(bal) else 0.0
        return Objectives(utility, robustness, (mode or self.mode).compression(sparsity), stability)

    @staticmethod
    def prescreened_objectives(sparsity: float, stability: float, mode: ScoringMode) -> Objectives:
        """A pre-screened plan's objectives: ``PRESCREEN_RETURN`` for the unmeasured ones."""
        return Objectives(PRESCREEN_RETURN, PRESCREEN_RETURN, sparsity / mode.s_max, stability)

    def evaluate(self, plan: PruningPlan, prescreen: bool = True, mode: ScoringMode | None = None,
                 compensation: BiasCompensation | None = None) -> PlanEvaluation:
        """Objectives and metrics of ``plan`` (metrics cached by fingerprint), compression scored in ``mode``
        (default: the evaluator's). With ``prescreen``, plans failing the stability pre-screen are not
        evaluated (search); reports evaluate every plan. With ``compensation`` the plan is scored as the
        bias-compensated pruned model computes (see the module doc)."""
        mode = mode or self.mode
        key = plan.fingerprint if compensation is None else f"{plan.fingerprint}+{COMPENSATED}"
        hit = self._hit(key, mode, prescreen)
        if hit is not None:
            return hit
        start = time.perf_counter()
        report = self.stability.evaluate(plan)
        if prescreen and not report.passes:
            evaluation = PlanEvaluation(key, plan.sparsity,
                                        self.prescreened_objectives(plan.sparsity, report.score, mode), {}, 0.0,
                                        prescreened=True, rho=report.rho)
        else:
            metrics = self._metrics(plan, compensation)
            seconds = time.perf_counter() - start
            evaluation = PlanEvaluation(key, plan.sparsity, self.objectives(metrics, plan.sparsity, report.score, mode),
                                        metrics, seconds, rho=report.rho)
        self.record(evaluation)
        return evaluation

    def cached(self, plan: PruningPlan, mode: ScoringMode | None = None) -> PlanEvaluation | None:
        """What :meth:`evaluate` (with the pre-screen, no compensation) answers from the cache, else None."""
        return self._hit(plan.fingerprint, mode or self.mode, prescreen=True)

    def _hit(self, key: str, mode: ScoringMode, prescreen: bool) -> PlanEvaluation | None:
        hit = self._cache.get(key)
        if hit is None or (hit.prescreened and not prescreen):
            return None
        # Objectives depend on the call's mode (s_max, target); the metrics do not.
        stability = hit.objectives.stability
        objectives = (self.prescreened_objectives(hit.sparsity, stability, mode) if hit.prescreened
                      else self.objectives(hit.metrics, hit.sparsity, stability, mode))
        return PlanEvaluation(**{**hit.__dict__, "objectives": objectives, "cached": True})

    def record(self, evaluation: PlanEvaluation) -> None:
        """Keep ``evaluation`` (made here, or by another process on the same model and evaluation set) in the
        cache and count it: a measured plan adds one evaluation and its ``seconds``."""
        if not evaluation.prescreened:
            self.evaluations += 1
            self.seconds += evaluation.seconds
        self._cache[evaluation.fingerprint] = evaluation
        self._write_cache(evaluation)

    @property
    def seconds_per_plan(self) -> float:
        return self.seconds / self.evaluations if self.evaluations else math.nan

    # --- disk cache ------------------------------------------------------------------------------------
    def _read_cache(self) -> dict[str, PlanEvaluation]:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        cache = {}
        for line in self.cache_path.read_text().splitlines():
            if line.strip():
                item = PlanEvaluation.from_dict(json.loads(line))
                cache[item.fingerprint] = item
        return cache

    def _write_cache(self, evaluation: PlanEvaluation) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a") as f:
            f.write(json.dumps(evaluation.to_dict()) + "\n")
