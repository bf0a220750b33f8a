"""Every baseline at 20-80% sparsity of the testbed's LM decoder, on its held-out test files.

POPE balanced accuracy per split, yes-ratio, ScienceQA accuracy, the evaluation cost per plan, the POPE mean with
its standard error, and a monotonicity flag. Methods:

- the "-style" allocators (``uniform``, ``owl``, ``flap``, ``random``, ``visual``; docs/method.md lists their gaps)
  and the faithful ones in ``worker.hipp.pruning.baselines`` (``wanda-sp``, ``owl-paper``, ``llm-pruner``, and any
  other allocator registered when this runs, e.g. FLAP's), all with Wanda-sp scores (``uniform`` also with
  magnitude);
- ``flap-paper`` (``pruning.baselines.flap``): its own WIFV scores and global search, scored with its bias
  compensation (the function the compensated sliced model computes); its plans are saved with the means
  (``*.means.safetensors``) so they replay with ``hipp prune --plan``;
- equal selection budget (``pruning.baselines.equal_budget``): best of K random allocations, best of K OWL lambdas,
  best of the LLM-Pruner protected-layer counts 0..K-1 (fewer on shallow models), chosen on the SEARCH set
  (``policy.search.testbed_search_set``: POPE validation images, ScienceQA val; never the test files) by the mean
  of the evaluator's utility (SQA / dense) and robustness (POPE, normalized) objectives. K is the number of plans
  HiPP's plan selection evaluates: ``worker.hipp.job.POLICY_SAMPLES`` sampled plans plus the mean plan (9).

The committed HiPP matched plans (``bench/results/plans/hipp-*.json``, ``--hipp-plans``) are evaluated on the
same questions, and ``bench.verdict`` sets each against the best baseline at its sparsity (95% intervals).

Calibration: by default the model's own source (``calibration_source.choose_calibration``: in-distribution
world samples for the testbed); ``--calibration synthetic`` (or ``world``) forces the other one, to show how
sensitive each baseline is to it (``--name baselines_synthetic --plans bench/results/plans/baselines-synthetic``).

Every plan is saved as replayable JSON under ``bench/results/plans/baselines/`` (``hipp prune --plan``).
A method is flagged when its mean POPE balanced accuracy rises from one sparsity to the next by more than two
standard errors of the difference (the two cells' standard errors in quadrature; each cell's the splits' binomial
standard errors, averaged).

    python -m bench.baselines                            # 1,000 questions per POPE split and 1,000 ScienceQA
    python -m bench.baselines --limit 300 --threads 1 --name baselines_faithful
    python -m bench.baselines --limit 300 --threads 1 --calibration synthetic --name baselines_synthetic \
        --plans bench/results/plans/baselines-synthetic
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.protocol import DEV_SEED, claim
from bench.report import RESULTS, markdown_table, write_report
from bench.verdict import HIPP, compare, verdict_markdown
from worker.hipp.calibration_source import choose_calibration
from worker.hipp.data.calibration import CalibrationSample, synthetic_samples
from worker.hipp.errors import OptionError
from worker.hipp.evaluation.baseline_grid import ALL_BASELINES, metrics_row
from worker.hipp.evaluation.intervals import has_outcomes, interval, outcomes_of, pope_mean, sqa_accuracy
from worker.hipp.evaluation.plan_evaluator import EvalSet, PlanEvaluation, PlanEvaluator
from worker.hipp.job import POLICY_SAMPLES
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.progress import SILENT, Reporter, TqdmReporter
from worker.hipp.pruning.allocators import ALLOCATORS, AllocationContext, Allocator
from worker.hipp.pruning.baselines.equal_budget import (
    best_of_k,
    llm_pruner_candidates,
    owl_lambda_candidates,
    random_candidates,
)
from worker.hipp.pruning.baselines.flap import build_flap_plan
from worker.hipp.pruning.plan import PruningPlan, geometry_of
from worker.hipp.pruning.planner import ScoringResult, allocation_context, build_plan, score_model
from worker.hipp.testbed.data import write_benchmarks

CACHE = Path.home() / ".cache" / "hipp" / "bench"
PLANS = RESULTS / "plans" / "baselines"
SELECTION_BUDGET = POLICY_SAMPLES + 1  # HiPP's plan selection: the sampled plans and the policy's mean plan
FAITHFUL = ("wanda-sp/wanda-sp", "owl-paper/wanda-sp", "llm-pruner/wanda-sp")
EQUAL_BUDGET = ("random", "owl-paper", "llm-pruner")
SPARSITIES = "0.2,0.3,0.4,0.5,0.6,0.7,0.8"
FLAP = "flap-paper/wifv"
OWN_SCORES = ("flap-paper",)  # allocators that bring their own scores: run by their own function below
HIPP_PLANS = sorted((RESULTS / "plans").glob("hipp-*.json"))
CALIBRATION_COUNT = 64


def test_set(limit: int | None, world_seed: int = DEV_SEED) -> EvalSet:
    """The testbed's test files of ``world_seed`` (the development seed's unless a report seed is given)."""
    root = CACHE / ("testbed-test" if world_seed == DEV_SEED else f"testbed-test-{world_seed}")
    if not (root / "scienceqa" / "problems.json").is_file():
        write_benchmarks(root, seed=world_seed)
    return EvalSet.from_dirs(root / "pope", root / "scienceqa", sqa_split="test", limit=limit)


def default_methods() -> list[str]:
    """The "-style" grid, the faithful baselines, and every other registered allocator with Wanda-sp scores."""
    methods = [*ALL_BASELINES, *FAITHFUL]
    named = {m.split("/")[0] for m in methods} | set(OWN_SCORES)
    return methods + [f"{a}/wanda-sp" for a in ALLOCATORS.names() if a not in named]


def calibration(model: str, source: str, seed: int) -> tuple[list[CalibrationSample], str]:
    """The calibration samples and their source name: the model's own choice, or the one forced."""
    chosen = choose_calibration(model, CALIBRATION_COUNT, seed)
    if source in ("default", chosen.source):
        return chosen.samples, chosen.source
    if source == "synthetic":
        return synthetic_samples(CALIBRATION_COUNT, seed=seed), "synthetic"
    return choose_calibration("testbed", CALIBRATION_COUNT, seed).samples, "world"


def pope_se(metrics: dict[str, Any]) -> float:
    """Standard error of the mean POPE balanced accuracy over the splits (independent questions)."""
    splits = metrics.get("pope", {})
    if not splits:
        return math.nan
    return math.sqrt(sum(m["balanced_accuracy_se"] ** 2 for m in splits.values())) / len(splits)


def monotonicity_flags(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per method, every step up in sparsity where mean POPE rises by more than 2 standard errors."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["baseline"] != "dense" and r.get("pope_bacc") is not None:
            by_method.setdefault(r["baseline"], []).append(r)
    flags: dict[str, list[str]] = {}
    for name, cells in by_method.items():
        cells = sorted(cells, key=lambda r: r["requested"])
        for a, b in zip(cells, cells[1:], strict=False):
            rise = b["pope_bacc"] - a["pope_bacc"]
            se = math.hypot(a["pope_se"], b["pope_se"])
            if rise > 2 * se:
                flags.setdefault(name, []).append(
                    f"{round(a['requested'] * 100)}->{round(b['requested'] * 100)}%: +{rise:.3f} (2 SE {2 * se:.3f})")
    return flags


def table(rows: list[dict[str, Any]], flags: dict[str, list[str]] | None = None) -> str:
    flags = flags or {}
    header = ["plan", "sparsity", "POPE rand", "POPE pop", "POPE adv", "yes (r/p/a)", "SQA", "s/plan",
              "POPE mean ± SE", "non-monotone"]
    body = [[r["baseline"], r["sparsity"], r.get("random_bacc"), r.get("popular_bacc"), r.get("adversarial_bacc"),
             f"{r.get('random_yes')}/{r.get('popular_yes')}/{r.get('adversarial_yes')}", r["sqa"], r["seconds"],
             f"{r['pope_bacc']} ± {r['pope_se']}" if "pope_se" in r else r.get("pope_bacc"),
             "FLAG" if r["baseline"] in flags else ""]
            for r in rows]
    return markdown_table(header, body)


def plan_file(name: str, sparsity: float, plans_dir: Path) -> Path:
    return plans_dir / f"{name.replace('/', '_').replace(' ', '-')}-{round(sparsity * 100)}.json"


def save_plan(plan: PruningPlan, name: str, sparsity: float, plans_dir: Path) -> str:
    plans_dir.mkdir(parents=True, exist_ok=True)
    path = plan_file(name, sparsity, plans_dir)
    plan.save(path)
    return str(path.relative_to(RESULTS.parent.parent) if path.is_relative_to(RESULTS.parent.parent) else path)


def row(name: str, requested: float, plan: PruningPlan, result: PlanEvaluation, plan_path: str,
        **extra: Any) -> dict[str, Any]:
    return (metrics_row(name, plan.sparsity, result.metrics, result.seconds)
            | intervals_of(result.metrics)
            | {"requested": requested, "pope_se": round(pope_se(result.metrics), 4),
               "sqa_se": round(result.metrics.get("scienceqa", {}).get("accuracy_se", math.nan), 4), "plan": plan_path,
               "layer_sparsities": [round(x, 4) for x in plan.layer_sparsities()], **extra})


def intervals_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """95% bootstrap intervals of POPE mean and SQA, and the per-question outcomes (for paired comparisons)."""
    if not has_outcomes(metrics):
        return {}
    return {"pope_ci": interval(metrics, pope_mean), "sqa_ci": interval(metrics, sqa_accuracy),
            "outcomes": outcomes_of(metrics)}


def selection_score(evaluator: PlanEvaluator, plan: PruningPlan) -> float:
    """Search-set score for best-of-K: the mean of utility (SQA vs dense) and robustness (POPE vs dense)."""
    o = evaluator.evaluate(plan, prescreen=False).objectives
    return (o.utility + o.robustness) / 2


def candidates_for(family: str, k: int, depth: int, seed: int) -> list[tuple[str, Allocator]]:
    if family == "random":
        return random_candidates(k, seed)
    if family == "owl-paper":
        return owl_lambda_candidates(k)
    return llm_pruner_candidates(k, depth)


def run_methods(loaded: LoadedModel, test: PlanEvaluator, samples: Sequence[CalibrationSample],
                sparsities: Sequence[float], methods: Sequence[str], seed: int, plans_dir: Path,
                reporter: Reporter = SILENT) -> tuple[list[dict[str, Any]], dict[str, ScoringResult]]:
    rows: list[dict[str, Any]] = []
    scorings: dict[str, ScoringResult] = {}
    for method in methods:
        allocation, criterion = method.split("/")
        if criterion not in scorings:
            scorings[criterion] = score_model(loaded, criterion, samples, seed=seed, reporter=reporter,
                                              with_activations=True)
        scoring = scorings[criterion]
        context = allocation_context(loaded, allocation, scoring, samples, seed, reporter)
        for s in sparsities:
            try:
                plan = build_plan(loaded, s, criterion, allocation, samples=samples, seed=seed, scoring=scoring,
                                  context=context)
            except OptionError as e:
                rows.append({"baseline": method, "sparsity": s, "requested": s, "infeasible": str(e)})
                continue
            result = test.evaluate(plan, prescreen=False)
            rows.append(row(method, s, plan, result, save_plan(plan, method, s, plans_dir)))
    return rows, scorings


def run_flap(loaded: LoadedModel, test: PlanEvaluator, samples: Sequence[CalibrationSample],
             sparsities: Sequence[float], seed: int, plans_dir: Path) -> list[dict[str, Any]]:
    """FLAP as in its paper: its own scores and search, scored with its bias compensation."""
    rows: list[dict[str, Any]] = []
    for s in sparsities:
        try:
            flap = build_flap_plan(loaded, s, samples, seed=seed)
        except OptionError as e:
            rows.append({"baseline": FLAP, "sparsity": s, "requested": s, "infeasible": str(e)})
            continue
        result = test.evaluate(flap.plan, prescreen=False, compensation=flap.compensation)
        path = save_plan(flap.plan, FLAP, s, plans_dir)
        flap.compensation.save(plan_file(FLAP, s, plans_dir).with_suffix(".means.safetensors"))
        rows.append(row(FLAP, s, flap.plan, result, path, bias_compensation=True))
    return rows


def run_hipp_plans(loaded: LoadedModel, test: PlanEvaluator, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The committed HiPP matched plans, evaluated on the same questions as the baselines."""
    rows = []
    for path in paths:
        plan = PruningPlan.load(path)
        requested = float(plan.meta.get("target_sparsity", plan.sparsity))  # type: ignore[arg-type]
        rows.append(row(HIPP, requested, plan, test.evaluate(plan, prescreen=False), str(path),
                        policy=plan.meta.get("policy")))
    return rows


def run_equal_budget(loaded: LoadedModel, test: PlanEvaluator, search: PlanEvaluator,
                     samples: Sequence[CalibrationSample], scoring: ScoringResult, sparsities: Sequence[float],
                     k: int, seed: int, plans_dir: Path, reporter: Reporter = SILENT) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    depth = geometry_of(loaded.adapter).num_layers
    for family in EQUAL_BUDGET:
        context = allocation_context(loaded, family, scoring, samples, seed, reporter)
        candidates = candidates_for(family, k, depth, seed)
        name = f"best-of-{len(candidates)} {family}/wanda-sp"
        for s in sparsities:
            def build(allocator: Allocator, s: float = s, context: AllocationContext = context) -> PruningPlan:
                return build_plan(loaded, s, "wanda-sp", allocator, samples=samples, seed=seed, scoring=scoring,
                                  context=context)

            try:
                selection = best_of_k(candidates, build, lambda plan: selection_score(search, plan))
            except OptionError as e:
                rows.append({"baseline": name, "sparsity": s, "requested": s, "infeasible": str(e)})
                continue
            result = test.evaluate(selection.plan, prescreen=False)
            rows.append(row(name, s, selection.plan, result, save_plan(selection.plan, name, s, plans_dir),
                            selected=selection.label, search_evaluations=selection.evaluations,
                            infeasible_candidates=list(selection.infeasible),
                            search_scores=[[label, round(v, 4)] for label, v in selection.scores]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--sparsities", default=SPARSITIES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="testbed", help="a testbed-world model (default: the shipped testbed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", help="comma-separated allocation/criterion (default: every baseline)")
    parser.add_argument("--k", type=int, default=SELECTION_BUDGET, help="plans per best-of-K selection")
    parser.add_argument("--search-limit", type=int, default=120, help="POPE questions per split / SQA at search")
    parser.add_argument("--no-equal-budget", action="store_true")
    parser.add_argument("--name", default="baselines", help="result name under bench/results")
    parser.add_argument("--plans", type=Path, default=PLANS, help="where every baseline plan is saved")
    parser.add_argument("--calibration", choices=("default", "world", "synthetic"), default="default",
                        help="calibration source (default: the model's own; the other shows the sensitivity)")
    parser.add_argument("--hipp-plans", type=Path, nargs="*", default=None,
                        help="HiPP plans to compare (default: the committed matched plans, for the testbed)")
    parser.add_argument("--no-flap", action="store_true", help="leave out flap-paper")
    parser.add_argument("--world-seed", type=int, default=DEV_SEED,
                        help="test files of this world seed; a seed other than the development one is a frozen-"
                             "protocol report, recorded in bench/results/protocol.json (bench.protocol)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.world_seed != DEV_SEED:
        claim(args.world_seed, args.name)
    reporter = TqdmReporter()
    started = time.perf_counter()
    loaded = load_model(args.model)
    evaluator = PlanEvaluator(loaded, test_set(args.limit, args.world_seed), reporter=reporter)
    samples, source = calibration(args.model, args.calibration, args.seed)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    methods = args.methods.split(",") if args.methods else default_methods()
    run_flap_paper = not args.no_flap and (args.methods is None or FLAP in methods)
    methods = [m for m in methods if m != FLAP]
    rows = [metrics_row("dense", 0.0, evaluator.dense_metrics) | intervals_of(evaluator.dense_metrics)
            | {"requested": 0.0, "pope_se": round(pope_se(evaluator.dense_metrics), 4)}]
    method_rows, scorings = run_methods(loaded, evaluator, samples, sparsities, methods, args.seed, args.plans,
                                        reporter)
    rows += method_rows
    if run_flap_paper:
        rows += run_flap(loaded, evaluator, samples, sparsities, args.seed, args.plans)
    hipp_plans = args.hipp_plans if args.hipp_plans is not None else (HIPP_PLANS if args.model == "testbed" else [])
    rows += run_hipp_plans(loaded, evaluator, hipp_plans)
    if not args.no_equal_budget:
        from worker.hipp.policy.search import testbed_search_set

        search = PlanEvaluator(loaded, testbed_search_set(CACHE / "testbed-search", limit=args.search_limit),
                               reporter=reporter)
        scoring = scorings.get("wanda-sp") or score_model(loaded, "wanda-sp", samples, seed=args.seed,
                                                          with_activations=True)
        rows += run_equal_budget(loaded, evaluator, search, samples, scoring, sparsities, args.k, args.seed,
                                 args.plans, reporter)
    feasible = [r for r in rows if "infeasible" not in r]
    flags = monotonicity_flags(feasible)
    infeasible = [f"{r['baseline']} at {r['requested']}: {r['infeasible']}" for r in rows if "infeasible" in r]
    verdict = compare(feasible)
    md = (f"Testbed, world seed {args.world_seed}, calibration: {source} ({CALIBRATION_COUNT} samples), "
          f"{evaluator.evalset.size()} test questions per plan (POPE {args.limit} per split), "
          f"logit scoring, masks (flap-paper: its bias compensation); "
          f"evaluation cost {evaluator.seconds_per_plan:.2f} s per plan "
          f"({args.threads} threads); best-of-K selections spend K = {args.k} search-set evaluations "
          f"({args.search_limit} POPE questions per split and SQA problems)\n\n" + table(feasible, flags)
          + "\n\nNon-monotone (mean POPE rises by more than 2 SE to the next sparsity): "
          + ("; ".join(f"{m}: {', '.join(v)}" for m, v in flags.items()) or "none")
          + ("\n\nInfeasible: " + "; ".join(infeasible) if infeasible else "")
          + "\n\n## HiPP's committed matched plans against the best baseline\n\n" + verdict_markdown(verdict))
    write_report(args.name, {"rows": rows, "flags": flags, "verdict": verdict, "calibration": source,
                             "world_seed": args.world_seed,
                             "seconds_per_plan": evaluator.seconds_per_plan,
                             "questions_per_plan": evaluator.evalset.size(), "k": args.k,
                             "wall_seconds": round(time.perf_counter() - started, 1)}, md, module="baselines")


if __name__ == "__main__":
    main()
