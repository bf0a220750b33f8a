"""What a pruning run decides, one owner per decision: the entry points that ``hipp prune``, the benchmarks and
the service's job pipeline (``worker/pipeline/``) share. The pipeline runs them and records what they return.

- :func:`choose_plan`: which plan a preference gets. A trained policy's best non-dominated plan when there is
  a policy (the one the caller found, else :func:`stored_policy`), else the baseline allocator's (uniform
  allocation, Wanda-sp importance) at a sparsity that follows the compression weight
  (:func:`baseline_sparsity`) or the caller's matched target. :func:`replay_plan`: a plan an earlier run
  considered, taken as it is (no search), if it fits the model.
- :func:`plot_plans`: the two pictures every job keeps of its plans: the plans considered in (sparsity,
  utility, robustness) space with the chosen one marked, and the chosen plan's per-layer allocation.
- :func:`measure`, :func:`pruned_metrics`, :func:`evaluate_on_world`, :func:`evaluate_on_files`: what is
  measured of a model (parameters, fixed-prompt latency, POPE and ScienceQA-style accuracy) and on which data
  (the world's test benchmarks, or the caller's benchmark files); :func:`recover_on_world`,
  :func:`recover_on_conversations`: which conversations recovery trains on. Which images a model is calibrated on is
  :mod:`worker.hipp.calibration_source`'s choice.
- :func:`resolve_device`, :func:`export_dtype`: what ``auto`` means for the device and the export dtype.

The last room: it may import every other room, and no room imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.errors import PlanError
from worker.hipp.evaluation.batch import PlanBatchEvaluator
from worker.hipp.evaluation.latency import prompt_latency
from worker.hipp.evaluation.plan_evaluator import EvalSet, PlanEvaluator
from worker.hipp.evaluation.runner import evaluate
from worker.hipp.models.decoding import device_name, latency_report
from worker.hipp.models.export_options import AUTO
from worker.hipp.models.loading import LoadedModel, resolve_dtype
from worker.hipp.plots import PlanPoint, plot_layer_units, plot_plan_points
from worker.hipp.policy.search import (
    SearchSetup,
    choose_candidate,
    prepare_search,
    sample_plans,
    testbed_search_set,
)
from worker.hipp.policy.store import StoredPolicy, policy_for_model
from worker.hipp.preference import Preference
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.layer_counts import max_sparsity
from worker.hipp.pruning.plan import PruningPlan, geometry_of
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.rounding import default_mlp_multiple
from worker.hipp.recovery.conversations import Conversation, world_conversations
from worker.hipp.recovery.training import RecoveryConfig, RecoveryResult, recover
from worker.hipp.testbed.data import write_benchmarks

#: Preference -> sparsity for the baseline allocator: no compression weight -> SPARSITY_MIN, all -> SPARSITY_MAX.
SPARSITY_MIN, SPARSITY_MAX = 0.05, 0.6
BASELINE_CRITERION, BASELINE_ALLOCATION = "wanda-sp", "uniform"
#: Plans sampled from a policy per preference, besides its mean plan.
POLICY_SAMPLES = 8
#: Where a search's plans are scored: a batch evaluator for the search's setup (default: in process).
EvaluationsFor = Callable[[SearchSetup], PlanBatchEvaluator]
#: Recovery sees each conversation about once in short runs and cycles through these in long ones.
MAX_RECOVERY_CONVERSATIONS = 512


def resolve_device(device: str) -> str:
    """``auto``: the GPU when there is one, else the CPU; any other name as given."""
    if device != AUTO:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def export_dtype(name: str) -> torch.dtype | None:
    """The dtype an export is written in; ``None`` for ``auto``: the source checkpoint's own."""
    return None if name == AUTO else resolve_dtype(name)


def parameter_count(loaded: LoadedModel) -> int:
    return sum(p.numel() for p in loaded.model.parameters())


# --- preference -> plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanChoice:
    plan: PruningPlan
    #: ``policy`` or ``baseline``.
    source: str
    #: Which policy made the plan, or why there was none.
    detail: str
    #: The policy's non-dominated plans (``chosen``, ``source``, ``plan`` summary, ``metrics``); empty for the
    #: baseline.
    considered: list[dict[str, Any]] = field(default_factory=list)
    #: Every plan considered, in full, in the order of ``considered`` (just ``plan`` when that is empty), so a
    #: later run can replay any of them.
    plans: list[PruningPlan] = field(default_factory=list)


def device_multiple(loaded: LoadedModel) -> int:
    """The MLP-width multiple plans for this model's device are rounded to (``pruning.rounding``)."""
    return default_mlp_multiple(str(loaded.device))


def stored_policy(loaded: LoadedModel) -> tuple[StoredPolicy | None, str]:
    """The newest policy in the store (shipped and user policies) trained for this exact model, and how it was
    found or why there is none."""
    stored = policy_for_model(loaded.adapter)
    if stored is None:
        return None, "no trained policy for this model"
    return stored, f"stored policy {stored.id} trained for this model"


def baseline_sparsity(preference: Preference, ceiling: float) -> float:
    """Sparsity for the baseline allocator: linear in the compression weight, capped below the model's
    ``ceiling`` (utility and robustness weights pull it towards ``SPARSITY_MIN``)."""
    s = SPARSITY_MIN + (SPARSITY_MAX - SPARSITY_MIN) * preference.compression
    return round(min(s, 0.95 * ceiling), 4)


def baseline_plan(loaded: LoadedModel, preference: Preference, target_sparsity: float | None,
                  samples: Sequence[CalibrationSample], reporter: Reporter = SILENT) -> PruningPlan:
    """The baseline allocator's plan at ``target_sparsity`` (matched mode), else at the preference's
    :func:`baseline_sparsity`."""
    ceiling = max_sparsity(geometry_of(loaded.adapter))
    if target_sparsity is not None:
        sparsity, mode = target_sparsity, "matched (target_sparsity)"
    else:
        sparsity, mode = baseline_sparsity(preference, ceiling), "from preference (compression weight)"
    reporter.log(f"target sparsity {sparsity:.3f} {mode}; the model's ceiling is {ceiling:.3f}")
    return build_plan(loaded, sparsity, criterion=BASELINE_CRITERION, allocation=BASELINE_ALLOCATION,
                      mlp_multiple=device_multiple(loaded), samples=samples, reporter=reporter)


def policy_plans(loaded: LoadedModel, policy: StoredPolicy, preference: Preference, target_sparsity: float | None,
                 samples: Sequence[CalibrationSample], search_dir: Path, limit: int,
                 reporter: Reporter = SILENT, search_set: EvalSet | None = None,
                 evaluations: EvaluationsFor | None = None,
                 ) -> tuple[PruningPlan, list[dict[str, Any]], list[PruningPlan]]:
    """The policy's mean plan and :data:`POLICY_SAMPLES` samples for ``preference``, scored on ``search_set``
    (the caller's benchmark files) or else the world's search split (``limit`` questions per split, files under
    ``search_dir``), in this process or where ``evaluations`` sends them; the best non-dominated one (by the
    preference-weighted return) is chosen. Returns it, the non-dominated plans' summaries and the same plans in
    full."""
    evalset = search_set if search_set is not None else testbed_search_set(search_dir, limit=limit)
    setup = prepare_search(loaded, evalset, samples, s_max=policy.policy.config.s_max,
                           mlp_multiple=device_multiple(loaded), reporter=reporter)
    candidates = sample_plans(setup, policy, preference.as_list(), samples=POLICY_SAMPLES, target=target_sparsity,
                              reporter=reporter, evaluations=evaluations(setup) if evaluations else None)
    best, front = choose_candidate(candidates)
    considered = []
    for c in front:
        summary = c.summary()
        metrics = summary.pop("metrics", {})
        considered.append({"chosen": c is best, "source": "policy", "plan": summary, "metrics": metrics})
    return best.plan, considered, [c.plan for c in front]


def choose_plan(loaded: LoadedModel, preference: Preference, target_sparsity: float | None,
                samples: Sequence[CalibrationSample], policy: StoredPolicy | None, found: str, search_dir: Path,
                limit: int, reporter: Reporter = SILENT, search_set: EvalSet | None = None,
                evaluations: EvaluationsFor | None = None) -> PlanChoice:
    """The plan for ``preference``: ``policy``'s (``found`` says which it is, or why there is none; its plans
    scored on ``search_set`` when given, through ``evaluations`` when given) when there is one, else the
    baseline allocator's. The plan's ``meta`` records ``source`` and ``source_detail``."""
    if policy is not None:
        reporter.log(f"planning with {found}")
        plan, considered, plans = policy_plans(loaded, policy, preference, target_sparsity, samples, search_dir,
                                               limit, reporter, search_set, evaluations)
        choice = PlanChoice(plan, "policy", found, considered, plans)
    else:
        plan = baseline_plan(loaded, preference, target_sparsity, samples, reporter)
        choice = PlanChoice(plan, "baseline", f"{found}; baseline allocator ({BASELINE_ALLOCATION}, "
                                              f"{BASELINE_CRITERION})", plans=[plan])
    plan.meta.update(source=choice.source, source_detail=choice.detail)
    return choice


def replay_plan(loaded: LoadedModel, plan: PruningPlan, detail: str, fingerprint: str = "") -> PlanChoice:
    """``plan`` (one an earlier run considered; ``detail`` says which) as this run's plan, without searching:
    it must be for ``loaded``'s geometry and, when ``fingerprint`` is given, still be the plan it names. Its
    ``meta`` keeps how it was first made (``replayed_source``) and records ``source`` = ``replay``."""
    if plan.geometry != geometry_of(loaded.adapter):
        raise PlanError(f"{detail} is for another model geometry than {loaded.reference}; replay it on the model "
                        "it was made for")
    if fingerprint and plan.fingerprint != fingerprint:
        raise PlanError(f"{detail} has fingerprint {plan.fingerprint}, not {fingerprint} as when the job was "
                        "submitted; submit the job again")
    plan.meta["replayed_source"] = {k: plan.meta[k] for k in ("source", "source_detail") if k in plan.meta}
    plan.meta.update(source="replay", source_detail=detail)
    return PlanChoice(plan, "replay", detail, plans=[plan])


def plot_plans(plan: PruningPlan, considered: Sequence[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """``front.png`` (each considered plan's sparsity against its utility, ScienceQA accuracy, and its
    robustness, POPE balanced accuracy, from its recorded ``metrics``; the chosen one marked) and
    ``allocation.png`` (the chosen plan's kept and removed heads and MLP channels per layer) in ``folder``."""
    points = [PlanPoint(float(c["plan"]["sparsity"]), *accuracies(c.get("metrics") or {}), chosen=bool(c["chosen"]))
              for c in considered]
    return {"front": plot_plan_points(points, folder / "front.png", title=f"plans considered ({len(points)})"),
            "allocation": plot_layer_units(plan, folder / "allocation.png", title=f"chosen plan {plan.fingerprint}")}


def accuracies(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """(ScienceQA accuracy, mean POPE balanced accuracy) of a plan's recorded metrics; None when not measured."""
    sqa = metrics.get("scienceqa", {}).get("accuracy")
    pope = PlanEvaluator.pope_balanced_accuracy(metrics) if metrics.get("pope") else None
    return (float(sqa) if sqa is not None else None), pope


# --- measurement ---------------------------------------------------------------------------------------------
def evaluate_on_world(loaded: LoadedModel, bench_dir: Path, limit: int, reporter: Reporter = SILENT) -> dict[str, Any]:
    """POPE and ScienceQA-style accuracy on the world's test benchmarks (written under ``bench_dir`` once,
    ``limit`` questions per split), scored from first-token logits."""
    if not (bench_dir / "scienceqa").exists():
        write_benchmarks(bench_dir, pope_images=max(1, -(-limit // 6)), sqa_sizes={"test": limit})
    return evaluate(loaded.model, loaded.processor, bench_dir / "pope", bench_dir / "scienceqa", limit=limit,
                    batch_size=16, report=reporter)


def evaluate_on_files(loaded: LoadedModel, pope_dir: Path | None, sqa_dir: Path | None, limit: int,
                      sqa_split: str = "test", reporter: Reporter = SILENT) -> dict[str, Any]:
    """POPE (every split found in ``pope_dir``) and ScienceQA-IMG (split ``sqa_split`` of ``sqa_dir``) accuracy
    on the caller's benchmark files in their official layout, ``limit`` questions per split, scored from
    first-token logits like :func:`evaluate_on_world`."""
    return evaluate(loaded.model, loaded.processor, pope_dir, sqa_dir, limit=limit, batch_size=16,
                    sqa_split=sqa_split, report=reporter)


def measure(loaded: LoadedModel, evaluation: Callable[[LoadedModel], dict[str, Any]] | None = None,
            ) -> dict[str, Any]:
    """What is recorded of a dense model: ``parameters``, ``metrics`` (what ``evaluation`` measures of it:
    :func:`evaluate_on_world` or :func:`evaluate_on_files`; none when it is None) and fixed-prompt
    ``latency``."""
    measured: dict[str, Any] = {"parameters": parameter_count(loaded)}
    if evaluation is not None:
        measured["metrics"] = evaluation(loaded)
    measured["latency"] = prompt_latency(loaded)
    return measured


def pruned_metrics(loaded: LoadedModel, plan: PruningPlan, dense: dict[str, Any]) -> dict[str, Any]:
    """Parameters, decoder sparsity and FLOPs per token of a pruned model against its :func:`measure`-d dense
    model, and its latency next to the dense one's (when that was timed)."""
    summary, pruned = plan.summary(), parameter_count(loaded)
    metrics: dict[str, Any] = {
        "parameters": pruned,
        "dense_parameters": dense["parameters"],
        "parameter_reduction": round(1 - pruned / dense["parameters"], 6),
        "decoder_sparsity": summary["sparsity"],
        "flops_per_token": summary["flops_per_token"],
        "dense_flops_per_token": summary["dense_flops_per_token"],
    }
    if "latency" in dense:
        metrics["latency"] = latency_report(
            dense["latency"], prompt_latency(loaded),
            ideal_speedup=summary["dense_flops_per_token"] / summary["flops_per_token"],
            device=device_name(loaded.device),
        )
    return metrics


# --- recovery ------------------------------------------------------------------------------------------------
def recover_on_world(loaded: LoadedModel, config: RecoveryConfig, teacher: LoadedModel | None = None,
                     reporter: Reporter = SILENT) -> tuple[RecoveryResult, dict[str, Any]]:
    """LoRA (or distillation from ``teacher``) recovery on the world's training conversations, merged back into
    ``loaded``. Returns the outcome and its record for ``metrics.json``."""
    count = MAX_RECOVERY_CONVERSATIONS
    if config.steps is not None:
        count = min(config.steps * config.batch_size, count)
    return recover_on_conversations(loaded, config, world_conversations(count, seed=0),
                                    f"world training split ({count} conversations)", teacher, reporter)


def recover_on_conversations(loaded: LoadedModel, config: RecoveryConfig, conversations: Sequence[Conversation],
                             data: Any, teacher: LoadedModel | None = None, reporter: Reporter = SILENT,
                             ) -> tuple[RecoveryResult, dict[str, Any]]:
    """LoRA (or distillation from ``teacher``) recovery on ``conversations`` (the caller's LLaVA-format data;
    ``data`` names them in the record), merged back into ``loaded``. Returns the outcome and its record."""
    outcome = recover(loaded, conversations, config, teacher=teacher, reporter=reporter)
    record = outcome.record(config, teacher=teacher.reference if teacher else None, data=data)
    record["conversations"] = len(conversations)
    return outcome, record
