"""Ablations with training seeds: what each part of the policy buys, apart from the seed it was trained with.

Each variant of ``bench.train_policies.VARIANTS`` (the full policy; no visual-sensitivity features; no stability
term; a flat per-layer policy) is trained by the shipped recipe (same GRPO steps for all) with training seeds
0, 1 and 2 on the testbed; the full policy's seed 0 is the shipped one. Train the others with

    python -m bench.train_policies --model testbed --variant V --seed S --out bench/results/ablations/V-sS

then measure every policy the same way:

    python -m bench.ablations --threads 2

Per policy, the plan a job gets at 30-70% for the robustness-leaning preference (``bench.frozen.hipp_matched``:
the mean plan and ``POLICY_SAMPLES`` samples scored on the search set, chosen by ``choose_candidate``; one
calibration draw for all), measured on the development seed's test files (this is development evidence, not a
report: ``bench.frozen`` is the report), with 95% bootstrap intervals; its hypervolume on that grid; and how much
of layer 0 it removes (the structure the testbed's POPE depends on, ``bench/results/fragility.md``).

Per variant: the mean over seeds and the seeds' range; the difference from the full policy, paired by seed and
question, with a 95% interval by bootstrap over questions (the seed-mean difference, all plans resampled with
the same indices) and, for training noise, the per-seed differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.baselines import CACHE, calibration, intervals_of, test_set
from bench.control import SHIPPED
from bench.frozen import SPARSITIES, objectives
from bench.hipp_vs_baselines import ROBUST
from bench.protocol import DEV_SEED
from bench.report import RESULTS, markdown_table, write_report
from bench.train_policies import VARIANTS
from worker.hipp.evaluation.baseline_grid import metrics_row
from worker.hipp.evaluation.intervals import mean_paired_difference, pope_mean, sqa_accuracy
from worker.hipp.evaluation.plan_evaluator import PlanEvaluator
from worker.hipp.job import POLICY_SAMPLES
from worker.hipp.models.loading import load_model
from worker.hipp.policy.search import (
    SearchSetup,
    choose_candidate,
    hypervolume,
    prepare_search,
    sample_plans,
    testbed_search_set,
)
from worker.hipp.policy.store import StoredPolicy, load_policy_dir
from worker.hipp.progress import TqdmReporter

POLICIES = RESULTS / "ablations"
SEEDS = (0, 1, 2)
MODEL = "testbed"
FULL = "full"
STATISTICS = {"pope": pope_mean, "sqa": sqa_accuracy}


def policy_dir(root: Path, variant: str, seed: int) -> Path:
    """Where the ``variant`` policy of training ``seed`` lives (the full policy's seed 0: the shipped one)."""
    return SHIPPED if (variant, seed) == (FULL, 0) else root / f"{variant}-s{seed}"


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    root = Path(__file__).resolve().parent.parent
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def training_returns(path: Path) -> list[float]:
    """The mean return of each GRPO step (from the policy's metrics.jsonl)."""
    log = path / "metrics.jsonl"
    if not log.is_file():
        return []
    return [round(json.loads(line)["return"], 4) for line in log.read_text().splitlines() if line.strip()]


def last_returns(returns: Sequence[float], steps: int = 5) -> float | None:
    """Mean training return of the last ``steps`` GRPO steps."""
    return round(statistics.fmean(returns[-steps:]), 4) if returns else None


def measure_policy(setup: SearchSetup, stored: StoredPolicy, test: PlanEvaluator, seed: int) -> list[dict[str, Any]]:
    """The plan a job gets at each sparsity of the grid, measured on the test files."""
    rows = []
    for s in SPARSITIES:
        best, _ = choose_candidate(sample_plans(setup, stored, ROBUST, POLICY_SAMPLES, target=s, seed=seed))
        result = test.evaluate(best.plan, prescreen=False)
        layers = best.plan.layer_sparsities()
        rows.append(metrics_row("hipp", best.plan.sparsity, result.metrics, result.seconds)
                    | intervals_of(result.metrics)
                    | {"requested": s, "fingerprint": best.plan.fingerprint, "layer0": round(layers[0], 4),
                       "layer_sparsities": [round(x, 4) for x in layers]})
    return rows


def seed_mean_difference(arm: Sequence[dict[str, Any]], full: Sequence[dict[str, Any]],
                         task: str) -> tuple[float, tuple[float, float]]:
    """Mean over seeds of (arm - full) on ``task`` ("pope" or "sqa"), with its 95% interval by bootstrap over
    questions (every plan scored on the same questions, resampled with the same indices)."""
    pairs = [(a["outcomes"], f["outcomes"]) for a, f in zip(arm, full, strict=True)]
    key = "pope_bacc" if task == "pope" else "sqa"
    point = statistics.fmean(a[key] - f[key] for a, f in zip(arm, full, strict=True))
    return point, mean_paired_difference(pairs, STATISTICS[task])


def summarize(policies: Sequence[dict[str, Any]], dense: dict[str, Any]) -> dict[str, Any]:
    """Per variant and sparsity: mean and range over seeds, and the paired difference from the full policy."""
    by = {(p["variant"], p["seed"]): p for p in policies}
    out: dict[str, Any] = {"variants": {}}
    for variant in VARIANTS:
        seeds = [s for s in SEEDS if (variant, s) in by]
        if not seeds:
            continue
        cells = []
        for i, s in enumerate(SPARSITIES):
            rows = [by[(variant, k)]["rows"][i] for k in seeds]
            full_rows = [by[(FULL, k)]["rows"][i] for k in seeds if (FULL, k) in by]
            cell: dict[str, Any] = {"requested": s}
            for key in ("pope_bacc", "sqa", "layer0"):
                values = [r[key] for r in rows]
                cell[key] = round(statistics.fmean(values), 4)
                cell[f"{key}_range"] = [min(values), max(values)]
            if variant != FULL and len(full_rows) == len(rows):
                for task in STATISTICS:
                    point, ci = seed_mean_difference(rows, full_rows, task)
                    key = "pope_bacc" if task == "pope" else "sqa"
                    cell[f"{task}_diff"] = round(point, 4)
                    cell[f"{task}_diff_ci"] = ci
                    cell[f"{task}_diff_per_seed"] = [round(r[key] - f[key], 4)
                                                     for r, f in zip(rows, full_rows, strict=True)]
            cells.append(cell)
        hv = [by[(variant, k)]["hypervolume"] for k in seeds]
        returns = [r for k in seeds if (r := by[(variant, k)]["last_return"]) is not None]
        out["variants"][variant] = {
            "seeds": seeds, "cells": cells,
            "hypervolume": round(statistics.fmean(hv), 4), "hypervolume_range": [min(hv), max(hv)],
            "layer0_mean": round(statistics.fmean(c["layer0"] for c in cells), 4),
            "last_return": round(statistics.fmean(returns), 4) if returns else None,
            "last_return_range": [min(returns), max(returns)] if returns else None}
    out["dense"] = metrics_row("dense", 0.0, dense)
    return out


def markdown(data: dict[str, Any]) -> str:
    summary = data["summary"]
    header = ["variant", "seeds", *[f"POPE {round(s * 100)}%" for s in SPARSITIES], "SQA 50%", "hypervolume",
              "layer-0 sparsity (mean over grid)", "training return (last 5 steps)"]
    rows = []
    for variant, v in summary["variants"].items():
        cells = v["cells"]
        mid = next(c for c in cells if abs(c["requested"] - 0.5) < 1e-6)
        rows.append([variant, len(v["seeds"]),
                     *[f"{c['pope_bacc']:.3f} ({c['pope_bacc_range'][0]:.3f}-{c['pope_bacc_range'][1]:.3f})"
                       for c in cells],
                     f"{mid['sqa']:.3f} ({mid['sqa_range'][0]:.3f}-{mid['sqa_range'][1]:.3f})",
                     f"{v['hypervolume']:.3f} ({v['hypervolume_range'][0]:.3f}-{v['hypervolume_range'][1]:.3f})",
                     f"{v['layer0_mean']:.2f}", v["last_return"]])
    diff_header = ["variant", *[f"POPE diff {round(s * 100)}%" for s in SPARSITIES],
                   *[f"SQA diff {round(s * 100)}%" for s in SPARSITIES]]
    diff_rows = []
    for variant, v in summary["variants"].items():
        if variant == FULL:
            continue
        diff_rows.append([variant, *[_diff(c, "pope") for c in v["cells"]], *[_diff(c, "sqa") for c in v["cells"]]])
    return ("Mean over training seeds (range across seeds in brackets), development seed's test files:\n\n"
            + markdown_table(header, rows)
            + "\n\nMinus the full policy, paired by training seed, points [95% bootstrap over questions]:\n\n"
            + markdown_table(diff_header, diff_rows))


def _diff(cell: dict[str, Any], task: str) -> str:
    if f"{task}_diff" not in cell:
        return "-"
    low, high = cell[f"{task}_diff_ci"]
    return f"{cell[f'{task}_diff'] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"


def plot(data: dict[str, Any], path: Path) -> Path:
    from worker.hipp.plots import figure

    with figure(path, ncols=4, figsize=(19, 4.2)) as (fig, axes):
        draw_ablations(data, fig, axes)
    return path


def draw_ablations(data: dict[str, Any], fig: Any, axes: Any) -> None:
    for variant, v in data["summary"]["variants"].items():
        xs = [c["requested"] for c in v["cells"]]
        for ax, key in zip(axes[:2], ("pope_bacc", "sqa"), strict=True):
            ys = [c[key] for c in v["cells"]]
            ax.plot(xs, ys, marker="o", label=variant)
            ax.fill_between(xs, [c[f"{key}_range"][0] for c in v["cells"]],
                            [c[f"{key}_range"][1] for c in v["cells"]], alpha=0.15)
        axes[2].plot(xs, [c["layer0"] for c in v["cells"]], marker="o", label=variant)
        curves = [p["returns"] for p in data["policies"] if p["variant"] == variant and p.get("returns")]
        if curves:
            steps = min(len(c) for c in curves)
            axes[3].plot(range(1, steps + 1), [statistics.fmean(c[i] for c in curves) for i in range(steps)],
                         label=variant)
    dense = data["summary"]["dense"]
    axes[0].axhline(dense["pope_bacc"], color="grey", ls=":", label="dense")
    axes[1].axhline(dense["sqa"], color="grey", ls=":", label="dense")
    for ax, title in zip(axes, ("POPE mean balanced accuracy", "ScienceQA accuracy", "layer-0 sparsity",
                                "training return (mean over seeds)"), strict=True):
        ax.set_xlabel("requested sparsity" if ax is not axes[3] else "GRPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Ablations on the testbed: mean over 3 training seeds (band: range across seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=Path, default=POLICIES, help="folder of VARIANT-sSEED policy folders")
    parser.add_argument("--limit", type=int, default=300, help="test questions per POPE split and SQA")
    parser.add_argument("--search-limit", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0, help="calibration draw and plan sampling")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure-present", action="store_true",
                        help="measure the policies trained so far and keep their rows (no report until all are)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reporter = TqdmReporter()
    started = time.perf_counter()
    found = {(v, s): policy_dir(args.policies, v, s) for v in VARIANTS for s in SEEDS}
    missing = [str(p) for p in found.values() if not (p / "policy.json").is_file()]
    if missing and not args.measure_present:
        raise SystemExit(f"missing trained policies (train them with bench.train_policies): {', '.join(missing)}")
    found = {key: path for key, path in found.items() if str(path) not in missing}
    loaded = load_model(MODEL)
    samples, source = calibration(MODEL, "default", args.seed)
    test = PlanEvaluator(loaded, test_set(args.limit, DEV_SEED), reporter=reporter)
    search = testbed_search_set(CACHE / "testbed-search", limit=args.search_limit)
    setup = prepare_search(loaded, search, samples, s_max=load_policy_dir(SHIPPED).policy.config.s_max,
                           reporter=reporter)
    dense = test.dense_metrics
    policies = []
    for (variant, seed), path in found.items():
        reporter.stage("policy", f"{variant} seed {seed}")
        stored = load_policy_dir(path)
        kept = CACHE / "ablations" / f"{stored.id}-{test.evalset.fingerprint()}-{search.fingerprint()}-{args.seed}.json"
        if kept.is_file():  # measured before on the same questions (a run with --measure-present)
            rows = json.loads(kept.read_text())
        else:
            rows = measure_policy(setup, stored, test, args.seed)
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(rows))
        policies.append({"variant": variant, "seed": seed, "policy": stored.id, "path": shown(path),
                         "trained_by": stored.meta.get("trained_by"),
            "training": stored.meta.get("training"), "returns": training_returns(path),
                         "last_return": last_returns(training_returns(path)),
            "hypervolume": round(hypervolume([objectives(r, dense) for r in rows]), 5), "rows": rows})
    data = {"model": MODEL, "world_seed": DEV_SEED, "calibration": source, "seeds": list(SEEDS),
            "sparsities": list(SPARSITIES), "preference": list(ROBUST), "questions_per_plan": test.evalset.size(),
            "search_questions": search.size(), "policies": policies}
    if missing:
        raise SystemExit(f"measured {len(policies)} policies (kept under {CACHE / 'ablations'}); still missing: "
                         f"{', '.join(missing)}")
    data["summary"] = summarize(policies, dense)
    data["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_report("ablations", data, markdown(data))
    print(f"plot: {plot(data, RESULTS / 'ablations.png')}")


if __name__ == "__main__":
    main()
