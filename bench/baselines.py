"""Every baseline allocator at 20/30/40/50% of the testbed's LM decoder, on its held-out test files.

POPE balanced accuracy per split, yes-ratio, ScienceQA accuracy and the evaluation cost per plan.

    python -m bench.baselines                 # 1,000 questions per POPE split and 1,000 ScienceQA problems
    python -m bench.baselines --limit 3000    # the full POPE splits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.report import markdown_table, write_report
from worker.hipp.calibration_source import default_samples
from worker.hipp.evaluation.baseline_grid import evaluate_baselines, metrics_row
from worker.hipp.evaluation.plan_evaluator import EvalSet, PlanEvaluator
from worker.hipp.models.loading import load_model
from worker.hipp.progress import TqdmReporter
from worker.hipp.testbed.data import write_benchmarks

CACHE = Path.home() / ".cache" / "hipp" / "bench"


def test_set(limit: int | None) -> EvalSet:
    root = CACHE / "testbed-test"
    if not (root / "scienceqa" / "problems.json").is_file():
        write_benchmarks(root)
    return EvalSet.from_dirs(root / "pope", root / "scienceqa", sqa_split="test", limit=limit)


def table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    header = ["plan", "sparsity", "POPE rand", "POPE pop", "POPE adv", "yes (r/p/a)", "SQA", "s/plan"]
    body = [[r["baseline"], r["sparsity"], r.get("random_bacc"), r.get("popular_bacc"), r.get("adversarial_bacc"),
             f"{r.get('random_yes')}/{r.get('popular_yes')}/{r.get('adversarial_yes')}", r["sqa"], r["seconds"]]
            for r in rows]
    return markdown_table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="testbed", help="a testbed-world model (default: the shipped testbed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reporter = TqdmReporter()
    loaded = load_model(args.model)
    evaluator = PlanEvaluator(loaded, test_set(args.limit), reporter=reporter)
    samples = default_samples("testbed", 64, args.seed)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    results = evaluate_baselines(loaded, evaluator, samples, sparsities, seed=args.seed, reporter=reporter)
    rows = [metrics_row("dense", 0.0, evaluator.dense_metrics)]
    rows += [metrics_row(name, plan.sparsity, r.metrics, r.seconds) for name, _, plan, r in results]
    md = (f"Testbed, {evaluator.evalset.size()} test questions per plan (POPE {args.limit} per split), "
          f"logit scoring, masks; evaluation cost {evaluator.seconds_per_plan:.2f} s per plan "
          f"({args.threads} threads)\n\n" + table(rows))
    write_report("baselines", {"rows": rows, "seconds_per_plan": evaluator.seconds_per_plan,
                               "questions_per_plan": evaluator.evalset.size()}, md)


if __name__ == "__main__":
    main()
