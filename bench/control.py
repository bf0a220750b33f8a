"""Control you can see: what a trained policy's chosen plan does as the preference moves.

Every plan here is chosen exactly as a job chooses it (``policy.search.choose_candidate`` over the mean plan and
``worker.hipp.job.POLICY_SAMPLES`` samples scored on the search set) and then measured on the test files,
with 95% bootstrap intervals:

1. The w_C sweep (free budget): w = ((1 - c) / 2, (1 - c) / 2, c), c = 0, 0.1, ..., 1. Targets: the chosen
   sparsity is monotone in c and adjacent points differ by at most 0.15.
2. Fixed budgets (default 50% and 60%): w = (0.9 (1 - r), 0.9 r, 0.1), r = 0, 0.1, ..., 1;
   Spearman(w_R, POPE) and Spearman(w_U, SQA). Target: Spearman(w_R, POPE) >= 0.8.
3. Named presets, the demo's among them: the plan each preference gets (README's table). The demo's
   preference is also chosen exactly as ``hipp demo``'s job does (``worker.hipp.job.choose_plan`` with the
   job's default calibration count and its search on ``--eval-samples`` questions), since a smaller search set
   can pick another plan.

    python -m bench.control --threads 1                     # the shipped testbed and its shipped policy
    python -m bench.control --model testbed-seed1 --policy DIR --name control_seed1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.baselines import CACHE, intervals_of, test_set
from bench.hipp_vs_baselines import spearman
from bench.protocol import DEV_SEED
from bench.report import markdown_table, write_report
from worker.hipp.calibration_source import choose_calibration, default_samples
from worker.hipp.evaluation.baseline_grid import metrics_row
from worker.hipp.evaluation.plan_evaluator import PlanEvaluator
from worker.hipp.job import POLICY_SAMPLES, choose_plan
from worker.hipp.models.loading import load_model
from worker.hipp.policy.search import SearchSetup, choose_candidate, prepare_search, sample_plans, testbed_search_set
from worker.hipp.policy.store import StoredPolicy, load_policy_dir
from worker.hipp.preference import Preference
from worker.hipp.progress import TqdmReporter

SHIPPED = Path(__file__).resolve().parent.parent / "worker" / "hipp" / "policy" / "shipped" / "testbed"
STEPS = [i / 10 for i in range(11)]
#: Named preferences (utility, robustness, compression); "demo" is ``hipp demo``'s default.
PRESETS: dict[str, tuple[float, float, float]] = {
    "demo": (0.7, 0.2, 0.1),  # hipp demo's default (worker/cli/serve.py)
    "previous demo": (0.5, 0.2, 0.3),
    "balanced": (1 / 3, 1 / 3, 1 / 3),
    "robust": (0.25, 0.65, 0.10),
    "small": (0.15, 0.15, 0.7),
}
MAX_STEP = 0.15
DEMO_EVAL_SAMPLES = 16  # hipp demo --eval-samples default: its job searches on this many questions per split
JOB_CALIBRATION_SAMPLES = 16  # the API's default calibration.samples


def compression_line() -> list[tuple[float, float, float]]:
    return [((1 - c) / 2, (1 - c) / 2, c) for c in STEPS]


def robustness_line() -> list[tuple[float, float, float]]:
    return [(0.9 * (1 - r), 0.9 * r, 0.1) for r in STEPS]


def chosen_row(setup: SearchSetup, policy: StoredPolicy, test: PlanEvaluator, w: Sequence[float],
               target: float | None, seed: int) -> dict[str, Any]:
    best, front = choose_candidate(sample_plans(setup, policy, list(w), POLICY_SAMPLES, target, seed))
    result = test.evaluate(best.plan, prescreen=False)
    return (metrics_row("hipp", best.plan.sparsity, result.metrics, result.seconds) | intervals_of(result.metrics)
            | {"w": [round(x, 4) for x in w], "target": target, "front_size": len(front),
               "fingerprint": best.plan.fingerprint})


def demo_as_run(loaded: Any, policy: StoredPolicy, test: PlanEvaluator, model: str, work: Path) -> dict[str, Any]:
    """The demo preference's plan chosen by the engine call a job makes, with the job's defaults."""
    choice = choose_plan(loaded, Preference.from_values(PRESETS["demo"]), None,
                         choose_calibration(model, JOB_CALIBRATION_SAMPLES).samples, policy, "shipped policy",
                         work, DEMO_EVAL_SAMPLES)
    result = test.evaluate(choice.plan, prescreen=False)
    return (metrics_row("hipp", choice.plan.sparsity, result.metrics, result.seconds) | intervals_of(result.metrics)
            | {"w": [round(x, 4) for x in PRESETS["demo"]], "target": None, "fingerprint": choice.plan.fingerprint,
               "preset": f"demo, as hipp demo's job chooses it ({DEMO_EVAL_SAMPLES} search questions per split)"})


def sweep_checks(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The w_C sweep's two targets: monotone sparsity, adjacent steps at most :data:`MAX_STEP`."""
    s = [r["sparsity"] for r in rows]
    steps = [b - a for a, b in zip(s, s[1:], strict=False)]
    return {"monotone": all(d >= 0 for d in steps), "largest_step": round(max(abs(d) for d in steps), 4),
            "smooth": all(abs(d) <= MAX_STEP for d in steps)}


def correlations(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {"spearman_wR_pope": round(spearman([r["w"][1] for r in rows], [r["pope_bacc"] for r in rows]), 3),
            "spearman_wU_sqa": round(spearman([r["w"][0] for r in rows], [r["sqa"] for r in rows]), 3)}


def _table(rows: Sequence[dict[str, Any]], label: str) -> str:
    return markdown_table(
        [label, "chosen sparsity", "POPE mean [95%]", "SQA [95%]", "yes (r/p/a)"],
        [[r.get("preset") or r["w"], r["sparsity"], f"{r['pope_bacc']} {r.get('pope_ci', '')}",
          f"{r['sqa']} {r.get('sqa_ci', '')}",
          f"{r.get('random_yes')}/{r.get('popular_yes')}/{r.get('adversarial_yes')}"]
         for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--policy", type=Path, default=SHIPPED, help="a trained policy directory")
    parser.add_argument("--budgets", default="0.5,0.6", help="fixed budgets of the utility/robustness sweep")
    parser.add_argument("--search-limit", type=int, default=120)
    parser.add_argument("--limit", type=int, default=300, help="test questions per POPE split and SQA")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="control")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    reporter = TqdmReporter()
    loaded = load_model(args.model)
    policy = load_policy_dir(args.policy)
    setup = prepare_search(loaded, testbed_search_set(CACHE / "testbed-search", limit=args.search_limit),
                           default_samples(args.model, 64, args.seed), s_max=policy.policy.config.s_max,
                           reporter=reporter)
    test = PlanEvaluator(loaded, test_set(args.limit, DEV_SEED), s_max=policy.policy.config.s_max, reporter=reporter)

    presets = [chosen_row(setup, policy, test, w, None, args.seed) | {"preset": name} for name, w in PRESETS.items()]
    presets.insert(1, demo_as_run(loaded, policy, test, args.model, CACHE / f"control-demo-{args.model}"))
    compression = [chosen_row(setup, policy, test, w, None, args.seed) for w in compression_line()]
    budgets = [float(b) for b in args.budgets.split(",")]
    fixed = {b: [chosen_row(setup, policy, test, w, b, args.seed) for w in robustness_line()] for b in budgets}
    checks = sweep_checks(compression)
    rho = {b: correlations(rows) for b, rows in fixed.items()}
    dense = metrics_row("dense", 0.0, test.dense_metrics) | intervals_of(test.dense_metrics)
    md = (f"Policy `{policy.id}` on `{args.model}` (world seed {DEV_SEED}: development), each plan chosen as a job "
          f"chooses it ({POLICY_SAMPLES} samples + the mean plan on the search set, {args.search_limit} questions), "
          f"measured on {test.evalset.size()} test questions. Dense: POPE {dense['pope_bacc']} "
          f"{dense.get('pope_ci')}, SQA {dense['sqa']} {dense.get('sqa_ci')}.\n\n"
          f"### Presets\n\n{_table(presets, 'preference')}\n\n"
          f"### w_C sweep (free budget), w = ((1-c)/2, (1-c)/2, c)\n\n{_table(compression, 'w')}\n\n"
          f"Monotone: {checks['monotone']}; largest step between adjacent points {checks['largest_step']} "
          f"(target <= {MAX_STEP}: {'met' if checks['smooth'] else 'missed'}).\n\n"
          + "\n\n".join(f"### Fixed budget {round(100 * b)}%, w = (0.9(1-r), 0.9r, 0.1)\n\n{_table(rows, 'w')}\n\n"
                        f"Spearman(w_R, POPE) {rho[b]['spearman_wR_pope']} (target >= 0.8), "
                        f"Spearman(w_U, SQA) {rho[b]['spearman_wU_sqa']}" for b, rows in fixed.items()))
    write_report(args.name, {"policy": policy.id, "model": args.model, "world_seed": DEV_SEED, "dense": dense,
                             "presets": presets, "compression_sweep": compression, "sweep_checks": checks,
                             "fixed_budgets": {str(b): rows for b, rows in fixed.items()},
                             "correlations": {str(b): v for b, v in rho.items()},
                             "wall_seconds": round(time.perf_counter() - started, 1)}, md, module="control")


if __name__ == "__main__":
    main()
