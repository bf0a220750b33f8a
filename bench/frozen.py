"""The frozen-protocol report: HiPP against every baseline on a fresh world seed, for each testbed of the family.

Run once per member at a frozen design commit, then summarize:

    python -m bench.frozen --world-seed SEED --model testbed          # bench/results/frozen/SEED/testbed.{json,md}
    python -m bench.frozen --world-seed SEED --model testbed-seed1
    python -m bench.frozen --world-seed SEED --model testbed-deep
    python -m bench.frozen --world-seed SEED --summarize              # bench/results/frozen/SEED/frozen.{json,md}, PNG

Each report keeps its own folder (and its plans under bench/results/plans/frozen/SEED/): a later report, on a new
seed at a new design, sits beside the earlier ones instead of replacing them.

The seed is claimed in the protocol ledger (``bench.protocol``): refused if it is the development seed, if the
checkout is dirty, or if it was reported at another commit. Per member, with the member's own shipped policy:

- HiPP's matched plans at 30-70%: the policy's mean plan and ``POLICY_SAMPLES`` samples for the robustness-leaning
  preference, scored on the search set (the development seed's validation split, never the test files) and chosen
  by ``policy.search.choose_candidate``, as a job chooses;
- HiPP's free-budget front: the preference lines of ``bench.hipp_vs_baselines.sweeps`` chosen the same way;
- every baseline of ``bench.baselines`` (the "-style" grid, the faithful ones, flap-paper with its bias
  compensation, and the equal-selection-budget best-of-K ones) at the same sparsities, same calibration;
- all evaluated on the fresh seed's test files; per sparsity the best baseline on POPE against HiPP with 95%
  paired-bootstrap intervals (``bench.verdict``); the hypervolume of (utility, robustness, compression) of
  HiPP's plans against each baseline's on the same sparsity grid (and with HiPP's front added).

The summary averages HiPP minus the best baseline over the members at 50/60/70% (the issue's goal: at least 3 POPE
points, interval excluding zero, ScienceQA not lower; hypervolume ratio at least 1.2 on each member), with the
spread across members, and draws every member's fronts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.baselines import (
    CACHE,
    FLAP,
    calibration,
    default_methods,
    intervals_of,
    pope_se,
    run_equal_budget,
    run_flap,
    run_hipp_plans,
    run_methods,
    test_set,
)
from bench.hipp_vs_baselines import ROBUST, S_MAX, sweeps
from bench.protocol import claim
from bench.report import RESULTS, commit, markdown_table, write_report
from bench.verdict import HIPP, compare, verdict_markdown
from worker.hipp.evaluation.baseline_grid import metrics_row
from worker.hipp.evaluation.plan_evaluator import PlanEvaluator
from worker.hipp.job import POLICY_SAMPLES
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.policy.search import SearchSetup, choose_candidate, prepare_search, sample_plans, testbed_search_set
from worker.hipp.policy.store import StoredPolicy, policy_for_model
from worker.hipp.progress import Reporter, TqdmReporter

FAMILY = ("testbed", "testbed-seed1", "testbed-deep")
SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
GOAL_SPARSITIES = (0.5, 0.6, 0.7)
GOAL_POPE_POINTS = 3.0
GOAL_HV_RATIO = 1.2
OUT = RESULTS / "frozen"
PLANS = RESULTS / "plans" / "frozen"
Z95 = 1.96


def report_dir(world_seed: int) -> Path:
    """Where the report on ``world_seed`` keeps its member results, summary and plot."""
    return OUT / str(world_seed)


def reported_seeds(ledger: Path | None = None) -> list[int]:
    """The world seeds with a summarized report, in the order the protocol ledger claimed them."""
    from bench.protocol import LEDGER, read_ledger

    seeds = [e["seed"] for e in read_ledger(ledger or LEDGER) if e["report"] == "frozen"]
    return [s for i, s in enumerate(seeds) if s not in seeds[:i] and (report_dir(s) / "frozen.json").is_file()]


# --- one member ------------------------------------------------------------------------------------------------
def hipp_matched(setup: SearchSetup, stored: StoredPolicy, sparsities: Sequence[float], plans_dir: Path,
                 seed: int) -> list[Path]:
    """The plan a job gets at each requested sparsity for the robustness-leaning preference, saved as JSON."""
    plans_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in sparsities:
        best, _ = choose_candidate(sample_plans(setup, stored, ROBUST, POLICY_SAMPLES, target=s, seed=seed))
        path = plans_dir / f"hipp-{round(s * 100)}.json"
        best.plan.save(path)
        paths.append(path)
    return paths


def hipp_front(setup: SearchSetup, stored: StoredPolicy, test: PlanEvaluator, seed: int) -> list[dict[str, Any]]:
    """Free-budget plans along the preference lines, chosen as a job chooses, measured on the test files."""
    points = []
    for line, ws in sweeps().items():
        for w in ws:
            best, _ = choose_candidate(sample_plans(setup, stored, w, POLICY_SAMPLES, seed=seed))
            result = test.evaluate(best.plan, prescreen=False)
            points.append({"line": line, "w": list(w), **metrics_row("HiPP front", best.plan.sparsity,
                                                                       result.metrics, result.seconds)})
    return points


def objectives(row: dict[str, Any], dense: dict[str, Any]) -> tuple[float, float, float]:
    """(utility, robustness, compression) of a row against the dense model: SQA / dense, POPE above chance
    relative to dense, sparsity / s_max (the policies' s_max)."""
    dense_pope = PlanEvaluator.pope_balanced_accuracy(dense)
    dense_sqa = dense["scienceqa"]["accuracy"]
    return (row["sqa"] / dense_sqa, (row["pope_bacc"] - 0.5) / (dense_pope - 0.5), row["sparsity"] / S_MAX)


def hypervolumes(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
                 dense: dict[str, Any]) -> dict[str, Any]:
    from worker.hipp.policy.search import hypervolume

    by_method: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["baseline"] != "dense" and "infeasible" not in r:
            by_method.setdefault(r["baseline"], []).append(objectives(r, dense))
    hv = {name: hypervolume(points) for name, points in by_method.items()}
    hipp = hv.pop(HIPP, 0.0)
    with_front = hypervolume(by_method.get(HIPP, []) + [objectives(p, dense) for p in front])
    best_name = max(hv, key=lambda k: hv[k]) if hv else None
    best = hv[best_name] if best_name else math.nan
    return {"per_method": {k: round(v, 5) for k, v in hv.items()}, "hipp": round(hipp, 5),
            "hipp_with_front": round(with_front, 5), "best_baseline": best_name, "best": round(best, 5),
            "ratio": round(hipp / best, 4) if best else None,
            "ratio_with_front": round(with_front / best, 4) if best else None}


def run_member(model: str, world_seed: int, limit: int, search_limit: int, seed: int, k: int,
               reporter: Reporter) -> dict[str, Any]:
    started = time.perf_counter()
    loaded: LoadedModel = load_model(model)
    stored = policy_for_model(loaded.adapter)
    if stored is None:
        raise SystemExit(f"no shipped policy for {model}: train one (python -m bench.train_policies) first")
    test = PlanEvaluator(loaded, test_set(limit, world_seed), reporter=reporter)
    samples, source = calibration(model, "default", seed)
    search = testbed_search_set(CACHE / "testbed-search", limit=search_limit)
    setup = prepare_search(loaded, search, samples, s_max=stored.policy.config.s_max, reporter=reporter)
    plans_dir = PLANS / str(world_seed) / model
    hipp_paths = hipp_matched(setup, stored, SPARSITIES, plans_dir, seed)
    front = hipp_front(setup, stored, test, seed)
    rows = [metrics_row("dense", 0.0, test.dense_metrics) | intervals_of(test.dense_metrics)
            | {"requested": 0.0, "pope_se": round(pope_se(test.dense_metrics), 4)}]
    methods = [m for m in default_methods() if m != FLAP]
    method_rows, scorings = run_methods(loaded, test, samples, SPARSITIES, methods, seed, plans_dir, reporter)
    rows += method_rows
    rows += run_flap(loaded, test, samples, SPARSITIES, seed, plans_dir)
    rows += [r | {"policy": stored.id} for r in run_hipp_plans(loaded, test, hipp_paths)]
    rows += run_equal_budget(loaded, test, setup.evaluator, samples, scorings["wanda-sp"], SPARSITIES, k, seed,
                             plans_dir, reporter)
    feasible = [r for r in rows if "infeasible" not in r]
    return {"model": model, "world_seed": world_seed, "design": commit(), "policy": stored.id,
            "policy_trained_by": stored.meta.get("trained_by"), "calibration": source,
            "questions_per_plan": test.evalset.size(), "search_questions": search.size(), "k": k,
            "rows": rows, "front": front, "verdict": compare(feasible),
            "hypervolume": hypervolumes(feasible, front, test.dense_metrics),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def member_markdown(data: dict[str, Any]) -> str:
    hv = data["hypervolume"]
    return (f"{data['model']}, world seed {data['world_seed']} (fresh), design {data['design']}, policy "
            f"{data['policy']}; {data['questions_per_plan']} test questions per plan; best-of-K with K = {data['k']}."
            f"\n\nHypervolume on the 30-70% grid: HiPP {hv['hipp']} vs best baseline {hv['best_baseline']} "
            f"{hv['best']} (ratio {hv['ratio']}; with HiPP's free-budget front added: {hv['ratio_with_front']})\n\n"
            + verdict_markdown(data["verdict"]))


# --- across members ----------------------------------------------------------------------------------------------
def _se(diff: dict[str, Any]) -> float:
    return (diff["high"] - diff["low"]) / (2 * Z95)


def pooled(members: Sequence[dict[str, Any]], task: str, sparsity: float) -> dict[str, Any] | None:
    """HiPP minus the best-on-POPE baseline at ``sparsity``, averaged over members: mean, a 95% interval (each
    member's paired-bootstrap interval read as a normal SE; members independent), and the members' spread."""
    diffs = []
    for m in members:
        cell = next((v for v in m["verdict"] if math.isclose(v["requested"], sparsity)), None)
        if cell is not None:
            diffs.append(cell[task])
    if not diffs:
        return None
    mean = statistics.fmean(d["difference"] for d in diffs)
    se = math.sqrt(sum(_se(d) ** 2 for d in diffs)) / len(diffs)
    values = [d["difference"] for d in diffs]
    return {"mean": round(mean, 4), "low": round(mean - Z95 * se, 4), "high": round(mean + Z95 * se, 4),
            "min": min(values), "max": max(values), "members": len(diffs)}


def summarize(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    goal = []
    for s in GOAL_SPARSITIES:
        pope, sqa = pooled(members, "pope", s), pooled(members, "sqa", s)
        goal.append({"requested": s, "pope": pope, "sqa": sqa,
                     "pope_goal_met": bool(pope and pope["mean"] * 100 >= GOAL_POPE_POINTS and pope["low"] > 0),
                     "sqa_not_lower": bool(sqa and sqa["high"] >= 0)})
    ratios = {m["model"]: m["hypervolume"]["ratio"] for m in members}
    return {"world_seed": members[0]["world_seed"], "designs": sorted({m["design"] for m in members}),
            "members": [m["model"] for m in members], "goal": goal, "hypervolume_ratio": ratios,
            "hypervolume_goal_met": all((r or 0) >= GOAL_HV_RATIO for r in ratios.values())}


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = []
    for g in summary["goal"]:
        p, q = g["pope"], g["sqa"]
        rows.append([f"{round(g['requested'] * 100)}%",
                     f"{p['mean'] * 100:+.1f} [{p['low'] * 100:+.1f}, {p['high'] * 100:+.1f}]" if p else "-",
                     f"{p['min'] * 100:+.1f} .. {p['max'] * 100:+.1f}" if p else "-",
                     f"{q['mean'] * 100:+.1f} [{q['low'] * 100:+.1f}, {q['high'] * 100:+.1f}]" if q else "-",
                     "yes" if g["pope_goal_met"] else "no", "yes" if g["sqa_not_lower"] else "no"])
    hv = ", ".join(f"{k} {v}" for k, v in summary["hypervolume_ratio"].items())
    return (f"World seed {summary['world_seed']} (fresh), design {', '.join(summary['designs'])}, members "
            f"{', '.join(summary['members'])}. HiPP minus the best baseline on POPE at each sparsity, in points, "
            "mean over members [95% interval] and the members' range:\n\n"
            + markdown_table(["sparsity", "POPE diff", "POPE range", "SQA diff", ">= 3 pts, CI > 0", "SQA not lower"],
                             rows)
            + f"\n\nHypervolume ratio (HiPP / best baseline, 30-70% grid): {hv}; goal >= {GOAL_HV_RATIO} on each: "
            + ("met" if summary["hypervolume_goal_met"] else "missed"))


def plot_fronts(members: Sequence[dict[str, Any]], path: Path) -> Path:
    from worker.hipp.plots import figure

    with figure(path, ncols=len(members), figsize=(4.5 * len(members), 7), nrows=2, squeeze=False) as (fig, axes):
        draw_fronts(members, fig, axes)
    return path


def draw_fronts(members: Sequence[dict[str, Any]], fig: Any, axes: Any) -> None:
    for col, m in enumerate(members):
        rows = [r for r in m["rows"] if "infeasible" not in r and r["baseline"] != "dense"]
        names = sorted({r["baseline"] for r in rows} - {HIPP})
        for row_i, metric in enumerate(("pope_bacc", "sqa")):
            ax = axes[row_i][col]
            for name in names:
                pts = sorted((r["sparsity"], r[metric]) for r in rows if r["baseline"] == name)
                ax.plot(*zip(*pts, strict=True), color="0.7", lw=0.8, marker=".", ms=3)
            hipp = sorted((r["sparsity"], r[metric]) for r in rows if r["baseline"] == HIPP)
            ax.plot(*zip(*hipp, strict=True), color="C3", lw=2, marker="o", label="HiPP (matched)")
            front = [(p["sparsity"], p[metric]) for p in m["front"]]
            ax.scatter(*zip(*front, strict=True), color="C0", s=12, label="HiPP (free budget)", zorder=3)
            ax.set_title(f"{m['model']}: {'POPE balanced acc.' if metric == 'pope_bacc' else 'ScienceQA'}")
            ax.set_xlabel("sparsity")
            if col == 0 and row_i == 0:
                ax.plot([], [], color="0.7", label="baselines")
                ax.legend(fontsize=7)
    fig.suptitle(f"World seed {members[0]['world_seed']} (fresh): HiPP and every baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-seed", type=int, required=True, help="a fresh world seed (see bench.protocol)")
    parser.add_argument("--model", choices=FAMILY, help="run one member")
    parser.add_argument("--summarize", action="store_true", help="combine the members' results")
    parser.add_argument("--limit", type=int, default=300, help="POPE questions per split and SQA problems")
    parser.add_argument("--search-limit", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0, help="calibration and sampling seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = report_dir(args.world_seed)
    if args.summarize:
        members = [json.loads((out / f"{m}.json").read_text()) for m in FAMILY if (out / f"{m}.json").is_file()]
        if not members or any(m["world_seed"] != args.world_seed for m in members):
            raise SystemExit(f"no member results for world seed {args.world_seed} under {out}")
        summary = summarize(members)
        plot_fronts(members, out / "frozen_fronts.png")
        write_report("frozen", summary, summary_markdown(summary), out_dir=out, module="frozen")
        return
    if args.model is None:
        raise SystemExit("give --model MEMBER or --summarize")
    torch.set_num_threads(args.threads)
    claim(args.world_seed, "frozen")
    from bench.baselines import SELECTION_BUDGET

    data = run_member(args.model, args.world_seed, args.limit, args.search_limit, args.seed, SELECTION_BUDGET,
                      TqdmReporter())
    write_report(args.model, data, member_markdown(data), out_dir=out, module="frozen")


if __name__ == "__main__":
    main()
