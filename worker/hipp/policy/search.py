"""Policy-driven plan search: set a model up for search, train a HiPP policy, and query it for plans.

``prepare_search`` computes once per model what every plan evaluation shares (policy state, criterion
scores, the plan evaluator with its prepared inputs). ``train_policy`` runs plan-level GRPO and stores the
policy artifact; ``sample_plans`` draws K plans for a preference (at a requested sparsity, from both allocation
heads) and scores them; ``pareto_front`` keeps the non-dominated ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.errors import OptionError
from worker.hipp.evaluation.batch import PlanBatchEvaluator
from worker.hipp.evaluation.plan_evaluator import EvalSet, PlanEvaluation, PlanEvaluator
from worker.hipp.models.loading import LoadedModel
from worker.hipp.policy.grpo import GRPOConfig, GRPOTrainer, PruningEnvironment, scalarize
from worker.hipp.policy.network import HippPolicy, PolicyConfig, validate_preference
from worker.hipp.policy.state import VISUAL_FEATURES, PolicyState, compute_policy_state
from worker.hipp.policy.store import StoredPolicy, model_fingerprint, save_policy
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import ScoringResult, score_model


def testbed_search_set(root: Path, seed: int = 1234, pope_images: int = 100, sqa_problems: int = 400,
                       limit: int | None = None) -> EvalSet:
    """Search-time evaluation data for the testbed: POPE on its own validation images and the ScienceQA
    validation split; disjoint from the test files that final reports use."""
    from worker.hipp.data.world import generate_scenes
    from worker.hipp.evaluation.tasks import pope, scienceqa
    from worker.hipp.evaluation.tasks.pope import ObjectStats

    pope_dir, sqa_dir = root / "pope_val", root / "sqa_val"
    if not (pope_dir / "annotations.json").is_file():
        scenes = generate_scenes(seed, pope_images, "pope_val", min_categories=3)
        pope.write_pope(scenes, pope_dir, seed, prefix="val")
    if not (sqa_dir / "problems.json").is_file():
        stats = ObjectStats.from_scenes(generate_scenes(seed, pope_images, "pope_val", min_categories=3))
        problems = scienceqa.generate_problems(seed, sqa_problems, "sqa_search_", stats)
        scienceqa.write_scienceqa({"val": problems}, sqa_dir)
    return EvalSet.from_dirs(pope_dir, sqa_dir, sqa_split="val", limit=limit)


@dataclass
class SearchSetup:
    loaded: LoadedModel
    state: PolicyState
    scoring: ScoringResult
    evaluator: PlanEvaluator
    mlp_multiple: int
    fingerprint: str


def prepare_search(loaded: LoadedModel, evalset: EvalSet, samples: Sequence[CalibrationSample],
                   s_max: float = 0.6, mlp_multiple: int = 1, batch_size: int = 64,
                   cache_dir: Path | None = None, reporter: Reporter = SILENT) -> SearchSetup:
    fingerprint = model_fingerprint(loaded.adapter)
    state_path = cache_dir / f"state-{fingerprint}.json" if cache_dir else None
    if state_path is not None and state_path.is_file():
        state = PolicyState.load(state_path)
    else:
        state = compute_policy_state(loaded, samples, reporter=reporter)
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state.save(state_path)
    scoring = score_model(loaded, "wanda-sp", samples, reporter=reporter)
    cache = cache_dir / f"evals-{fingerprint}-{evalset.size()}.jsonl" if cache_dir else None
    evaluator = PlanEvaluator(loaded, evalset, s_max=s_max, batch_size=batch_size, cache_path=cache,
                              reporter=reporter)
    return SearchSetup(loaded, state, scoring, evaluator, mlp_multiple, fingerprint)


def environment(setup: SearchSetup, policy: HippPolicy, drop_visual: bool = False,
                evaluations: PlanBatchEvaluator | None = None) -> PruningEnvironment:
    """The GRPO environment of ``setup`` for ``policy``; plans are scored through ``evaluations`` (default:
    ``setup``'s evaluator, in this process)."""
    state = setup.state.without(VISUAL_FEATURES) if drop_visual else setup.state
    return PruningEnvironment(policy, state, setup.evaluator, setup.scoring.scores, setup.mlp_multiple,
                              evaluations=evaluations)


def train_policy(setup: SearchSetup, out_dir: Path, policy_config: PolicyConfig | None = None,
                 grpo_config: GRPOConfig | None = None, drop_visual: bool = False, resume: bool = True,
                 reporter: Reporter = SILENT, extra_meta: dict[str, Any] | None = None,
                 evaluations: PlanBatchEvaluator | None = None) -> StoredPolicy:
    """Train a policy for ``setup``'s model with plan-level GRPO and save it to ``out_dir``. Each step's plans
    are scored as one batch through ``evaluations`` (default: ``setup``'s evaluator, in this process; the
    service's evaluation queue spreads them over workers): the trained policy is the same either way."""
    grpo_config = grpo_config or GRPOConfig()
    policy_config = policy_config or PolicyConfig(num_features=setup.state.features.shape[1],
                                                  s_max=setup.evaluator.mode.s_max)
    torch.manual_seed(grpo_config.seed)
    policy = HippPolicy(policy_config)
    env = environment(setup, policy, drop_visual, evaluations)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = GRPOTrainer(policy, env, grpo_config, out_dir, reporter)
    checkpoint = out_dir / "checkpoint"
    if resume and (checkpoint / "trainer.json").is_file():
        trainer.load_checkpoint(checkpoint)
        reporter.log(f"resumed at step {trainer.step_index}")
    else:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    counted = env.evaluations.evaluator  # remote evaluations are recorded (and counted) here too
    start_evals = counted.evaluations
    started = time.perf_counter()
    history = trainer.train()
    meta = {
        "model_fingerprint": setup.fingerprint,
        "model_reference": setup.loaded.reference,
        "family": setup.loaded.adapter.family,
        "feature_names": list(setup.state.names),
        "drop_visual": drop_visual,
        "grpo_config": grpo_config.__dict__ | {"matched_budgets": list(grpo_config.matched_budgets)},
        "training": {
            "steps": trainer.step_index,
            "wall_seconds": trainer.elapsed,
            "session_seconds": time.perf_counter() - started,
            "plan_evaluations": counted.evaluations - start_evals,
            "seconds_per_evaluation": counted.seconds_per_plan,
            "final_return": history[-1]["return"] if history else None,
        },
        "dense_metrics": setup.evaluator.dense_metrics,
        **(extra_meta or {}),
    }
    save_policy(policy, out_dir, meta)
    setup.state.save(out_dir / "state.json")
    if history:
        from worker.hipp.plots import plot_learning_curve

        plot_learning_curve(history, out_dir / "learning_curve.png")
    from worker.hipp.policy.store import load_policy_dir

    return load_policy_dir(out_dir)


#: Where a matched-sparsity search draws its allocations: the allocation head told the requested budget
#: ("matched") and the one the policy uses when it picks the budget itself ("free"), both applied at the
#: requested budget. The search set decides between them: on the development seed the free-mode allocation
#: protects the layers a member depends on where the matched-mode one does not (testbed-deep, testbed-seed1 at
#: 70%), and the other way round on the testbed (bench/results/allocation_source.md).
MATCHED_SOURCES = ("matched", "free")


@dataclass
class Candidate:
    plan: PruningPlan
    evaluation: PlanEvaluation
    value: float
    mean_plan: bool = False
    #: Which allocation head drew it: "free" (the budget the policy chose, or in matched mode the free-mode
    #: allocation at the requested budget) or "matched" (the head told the requested budget).
    allocation: str = "free"

    def summary(self) -> dict[str, Any]:
        o = self.evaluation.objectives
        return {"fingerprint": self.plan.fingerprint, "sparsity": self.plan.sparsity,
                "utility": o.utility, "robustness": o.robustness, "compression": o.compression,
                "stability": o.stability, "return": self.value, "prescreened": self.evaluation.prescreened,
                "mean_plan": self.mean_plan, "allocation": self.allocation, "metrics": self.evaluation.metrics,
                "layer_sparsities": self.plan.layer_sparsities()}


def split_samples(samples: int, sources: Sequence[str]) -> list[int]:
    """How many of ``samples`` each source draws (the first sources take the remainder)."""
    base, extra = divmod(samples, len(sources))
    return [base + (1 if i < extra else 0) for i in range(len(sources))]


def sample_plans(setup: SearchSetup, stored: StoredPolicy, preference: Sequence[float], samples: int = 8,
                 target: float | None = None, seed: int = 0, lambda_s: float = 0.1,
                 reporter: Reporter = SILENT, evaluations: PlanBatchEvaluator | None = None,
                 sources: Sequence[str] = MATCHED_SOURCES) -> list[Candidate]:
    """The policy's mean plan plus sampled plans for ``preference``, evaluated as one batch through
    ``evaluations`` (default: in this process). With a ``target`` sparsity each of ``sources`` (see
    :data:`MATCHED_SOURCES`) gives its mean plan and its share of ``samples``, each from its own random stream
    (``seed`` plus the source's place in :data:`MATCHED_SOURCES`: a source's plans do not depend on which others
    are asked for); without one, the free budget's mean plan and ``samples`` samples from ``seed``'s stream."""
    w = validate_preference(preference)
    if target is not None and (not sources or set(sources) - set(MATCHED_SOURCES)):
        raise OptionError(f"sources must be some of {', '.join(MATCHED_SOURCES)}, got {list(sources)}")
    drop_visual = bool(stored.meta.get("drop_visual"))
    env = environment(setup, stored.policy, drop_visual, evaluations)
    drawn = list(sources) if target is not None else ["free"]
    counts = split_samples(samples, drawn) if target is not None else [samples]
    actions: list[tuple[Any, bool, str]] = []
    for source, count in zip(drawn, counts, strict=True):
        offset = MATCHED_SOURCES.index(source) if target is not None else 0
        generator = torch.Generator().manual_seed(seed + offset)
        told = target if source == "matched" else None
        actions.append((stored.policy.mean_action(env.features, env.param_share, w, told), True, source))
        # Every sample keeps the budget head's mean (see HippPolicy.sample): the preference says how much, the
        # search compares where; sampling the budget too let the return's linear trade pick a far budget and jump.
        actions += [(stored.policy.sample(env.features, env.param_share, w, told, generator, mean_budget=True),
                     False, source) for _ in range(count)]
    meta = {"policy": stored.id, "preference": w.tolist(), "target_sparsity": target, "criterion": "wanda-sp",
            "allocation": "hipp"}
    plans = [env.plan_for(action, target, meta=meta | {"allocation_source": source})
             for action, _, source in actions]
    reporter.progress(0, len(plans), "plans")
    scored = env.score_many([(plan, target) for plan in plans], reporter)
    reporter.progress(len(plans), len(plans), "plans")
    candidates = []
    for plan, (_, is_mean, source), evaluation in zip(plans, actions, scored, strict=True):
        o = evaluation.objectives
        value = scalarize([o.utility, o.robustness, o.compression], w, o.stability, lambda_s)
        candidates.append(Candidate(plan, evaluation, value, is_mean, source))
    return candidates


def choose_candidate(candidates: Sequence[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The plan a job gets: the non-dominated candidate with the best preference-weighted return; and the
    non-dominated set it was chosen from (all candidates when none is measured)."""
    front = pareto_front(candidates) or list(candidates)
    return max(front, key=lambda c: c.value), front


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Non-dominated candidates on (utility, robustness, compression), unique by plan."""
    unique = {c.plan.fingerprint: c for c in candidates if not c.evaluation.prescreened}
    items = list(unique.values())
    return [c for c in items if not any(dominates(o.evaluation.objectives.as_vector(),
                                                  c.evaluation.objectives.as_vector()) for o in items)]


def write_candidates(candidates: Sequence[Candidate], front: Sequence[Candidate], path: Path) -> Path:
    front_ids = {c.plan.fingerprint for c in front}
    data = {"candidates": [c.summary() | {"non_dominated": c.plan.fingerprint in front_ids} for c in candidates],
            "plans": {c.plan.fingerprint: c.plan.to_dict() for c in front}}
    path.write_text(json.dumps(data, indent=1))
    return path


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float] = (0.0, 0.0, 0.0)) -> float:
    """Exact hypervolume dominated by ``points`` (maximization) above ``reference``, in 2 or 3 dimensions."""
    pts = [tuple(max(p[i] - reference[i], 0.0) for i in range(len(reference))) for p in points]
    pts = [p for p in pts if all(v > 0 for v in p)]
    if not pts:
        return 0.0
    if len(reference) == 2:
        area, best_y = 0.0, 0.0
        for x, y in sorted(pts, key=lambda p: -p[0]):
            if y > best_y:
                area += x * (y - best_y)
                best_y = y
        return area
    # Slice along the first axis: between consecutive x levels, the 2-D volume of points reaching that far.
    xs = sorted({p[0] for p in pts}, reverse=True)
    volume = 0.0
    for i, x in enumerate(xs):
        next_x = xs[i + 1] if i + 1 < len(xs) else 0.0
        slab = [(p[1], p[2]) for p in pts if p[0] >= x]
        volume += (x - next_x) * hypervolume(slab, (0.0, 0.0))
    return volume
