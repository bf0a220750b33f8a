"""Where a matched-sparsity search should draw its allocations: the head told the budget, the free-mode head, or both.

Per testbed-family member with its shipped policy, at 30-70% for the robustness-leaning preference, three ways
to choose the plan a job gets (each by ``choose_candidate`` over candidates scored on the search set, the
development seed's validation split):

- ``matched``: the mean plan and 8 samples of the allocation head told the requested budget (the design the
  frozen report at a641d8c measured);
- ``free``: the mean plan and 8 samples of the allocation the policy uses when it picks the budget itself,
  applied at the requested budget;
- ``both``: 4 + 4 of them (each source's mean plan and the first 4 of its samples: a subset of the two above,
  so the search set's choice between them is all that differs); what a job does now.

The chosen plans are measured on the development seed's test files with 95% bootstrap intervals, and ``both`` is
compared with ``matched`` (paired over questions). This is development evidence, not a report.

    python -m bench.allocation_source --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.baselines import CACHE, calibration, intervals_of, test_set
from bench.frozen import FAMILY, SPARSITIES
from bench.hipp_vs_baselines import ROBUST
from bench.protocol import DEV_SEED
from bench.report import markdown_table, write_report
from worker.hipp.evaluation.baseline_grid import metrics_row
from worker.hipp.evaluation.intervals import paired_difference, pope_mean, sqa_accuracy
from worker.hipp.evaluation.plan_evaluator import PlanEvaluator
from worker.hipp.job import POLICY_SAMPLES
from worker.hipp.models.loading import load_model
from worker.hipp.policy.search import (
    MATCHED_SOURCES,
    SearchSetup,
    choose_candidate,
    prepare_search,
    sample_plans,
    testbed_search_set,
)
from worker.hipp.policy.store import StoredPolicy, policy_for_model
from worker.hipp.progress import TqdmReporter

WAYS: dict[str, tuple[str, ...]] = {"matched": ("matched",), "free": ("free",), "both": MATCHED_SOURCES}


def chosen(setup: SearchSetup, stored: StoredPolicy, test: PlanEvaluator, target: float, seed: int,
           sources: Sequence[str]) -> dict[str, Any]:
    best, _ = choose_candidate(sample_plans(setup, stored, ROBUST, POLICY_SAMPLES, target, seed, sources=sources))
    result = test.evaluate(best.plan, prescreen=False)
    return (metrics_row("hipp", best.plan.sparsity, result.metrics, result.seconds) | intervals_of(result.metrics)
            | {"requested": target, "source": best.allocation, "fingerprint": best.plan.fingerprint,
               "layer0": round(best.plan.layer_sparsities()[0], 4)})


def run_member(model: str, limit: int, search_limit: int, seed: int, reporter: TqdmReporter) -> dict[str, Any]:
    loaded = load_model(model)
    stored = policy_for_model(loaded.adapter)
    if stored is None:
        raise SystemExit(f"no shipped policy for {model}: train one (python -m bench.train_policies) first")
    samples, source = calibration(model, "default", seed)
    test = PlanEvaluator(loaded, test_set(limit, DEV_SEED), reporter=reporter)
    setup = prepare_search(loaded, testbed_search_set(CACHE / "testbed-search", limit=search_limit), samples,
                           s_max=stored.policy.config.s_max, reporter=reporter)
    cells = []
    for s in SPARSITIES:
        ways = {way: chosen(setup, stored, test, s, seed, sources) for way, sources in WAYS.items()}
        diff = {task: paired_difference(ways["both"]["outcomes"], ways["matched"]["outcomes"], statistic)
                for task, statistic in (("pope", pope_mean), ("sqa", sqa_accuracy))}
        cells.append({"requested": s, "ways": ways, "both_minus_matched_ci": diff,
                      "both_minus_matched": {"pope": round(ways["both"]["pope_bacc"] - ways["matched"]["pope_bacc"], 4),
                                             "sqa": round(ways["both"]["sqa"] - ways["matched"]["sqa"], 4)}})
    return {"model": model, "policy": stored.id, "calibration": source,
            "dense": metrics_row("dense", 0.0, test.dense_metrics), "cells": cells}


def markdown(data: dict[str, Any]) -> str:
    header = ["member", "sparsity", *[f"{way}: POPE / SQA (layer 0)" for way in WAYS], "both picked",
              "both - matched, POPE points [95%]", "SQA points [95%]"]
    rows = []
    for member in data["members"]:
        for c in member["cells"]:
            (pl, ph), (sl, sh) = c["both_minus_matched_ci"]["pope"], c["both_minus_matched_ci"]["sqa"]
            d = c["both_minus_matched"]
            rows.append([member["model"], f"{round(c['requested'] * 100)}%",
                         *[f"{w['pope_bacc']:.3f} / {w['sqa']:.3f} ({w['layer0']:.2f})" for w in c["ways"].values()],
                         c["ways"]["both"]["source"], f"{d['pope'] * 100:+.1f} [{pl * 100:+.1f}, {ph * 100:+.1f}]",
                         f"{d['sqa'] * 100:+.1f} [{sl * 100:+.1f}, {sh * 100:+.1f}]"])
    mean = data["mean_both_minus_matched"]
    return (markdown_table(header, rows)
            + f"\n\nMean over members and sparsities, both - matched: POPE {mean['pope'] * 100:+.1f} points, "
              f"SQA {mean['sqa'] * 100:+.1f} points.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILY))
    parser.add_argument("--limit", type=int, default=300, help="test questions per POPE split and SQA")
    parser.add_argument("--search-limit", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reporter = TqdmReporter()
    started = time.perf_counter()
    members = [run_member(m, args.limit, args.search_limit, args.seed, reporter) for m in args.models]
    cells = [c for m in members for c in m["cells"]]
    data = {"world_seed": DEV_SEED, "preference": list(ROBUST), "samples": POLICY_SAMPLES, "members": members,
            "mean_both_minus_matched": {task: round(statistics.fmean(c["both_minus_matched"][task] for c in cells), 4)
                                        for task in ("pope", "sqa")},
            "wall_seconds": round(time.perf_counter() - started, 1)}
    write_report("allocation_source", data, markdown(data))


if __name__ == "__main__":
    main()
