"""HiPP-Prune against every baseline on the testbed: matched sparsity, the preference front, ablations.

1. Train the policy with plan-level GRPO on search-time data (POPE validation images, ScienceQA val) or
   load one (--policy). The trained policy can be shipped (--ship).
2. Matched sparsity 30/40/50/60%: the policy with a robustness-leaning preference samples K plans per budget,
   the best on the search data is chosen and evaluated on the held-out test files, as is every baseline.
3. The front: two lines of 11 preference vectors each in free-budget mode (w_robustness 0..1 with the rest split
   evenly between utility and compression; and w_robustness 0..0.9 taken from compression with w_utility fixed
   at 0.1), chosen plans evaluated on the test files; hypervolume of (utility, robustness, compression) of their
   union against each baseline's points (baselines also at 70/80%, as the policy may go up to s_max = 0.8);
   Spearman correlation of w_robustness with POPE balanced accuracy along each line.
4. Ablations, trained the same way: no visual-sensitivity features; no stability term; a flat per-layer policy.

    python -m bench.hipp_vs_baselines      # the defaults are the settings of bench/results/hipp_vs_baselines.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.baselines import test_set
from bench.report import markdown_table, write_report
from worker.hipp.calibration_source import default_samples
from worker.hipp.evaluation.baseline_grid import evaluate_baselines, metrics_row
from worker.hipp.evaluation.plan_evaluator import PlanEvaluator
from worker.hipp.models.loading import load_model
from worker.hipp.policy.grpo import GRPOConfig
from worker.hipp.policy.network import PolicyConfig
from worker.hipp.policy.search import (
    SearchSetup,
    hypervolume,
    prepare_search,
    sample_plans,
    testbed_search_set,
    train_policy,
)
from worker.hipp.policy.store import StoredPolicy, load_policy_dir
from worker.hipp.progress import TqdmReporter

CACHE = Path.home() / ".cache" / "hipp" / "bench"
ROBUST = (0.25, 0.65, 0.10)
S_MAX = 0.8
FRONT_ONLY = (0.7, 0.8)  # baselines' extra budgets for the front: the policy's budget reaches S_MAX


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else 0.0


def choose(setup: SearchSetup, stored: StoredPolicy, w: tuple[float, ...], target: float | None, k: int,
           seed: int) -> Any:
    candidates = [c for c in sample_plans(setup, stored, w, k, target, seed) if not c.evaluation.prescreened]
    return max(candidates, key=lambda c: c.value)


SWEEP_UTILITY = 0.1


def sweeps() -> dict[str, list[tuple[float, float, float]]]:
    """Two lines through the preference simplex along which w_robustness rises: taken evenly from utility and
    compression ("even"), and taken from compression only, utility fixed ("vs-compression")."""
    steps = [i / 10 for i in range(11)]
    rest = 1 - SWEEP_UTILITY
    return {"even": [((1 - r) / 2, r, (1 - r) / 2) for r in steps],
            "vs-compression": [(SWEEP_UTILITY, r * rest, rest - r * rest) for r in steps]}


PLANS = Path(__file__).parent / "results" / "plans"


def run_policy(name: str, setup: SearchSetup, test: PlanEvaluator, stored: StoredPolicy, k: int, seed: int,
               matched: list[float], do_sweep: bool, plans_dir: Path | None = None) -> dict[str, Any]:
    """Matched-sparsity plans (saved to ``plans_dir`` as ``<name>-<pct>.json`` when given, replayable with
    ``hipp prune --plan`` or ``bench.recovery --plan``) and, with ``do_sweep``, the preference sweep."""
    out: dict[str, Any] = {"name": name, "matched": [], "sweep": []}
    for s in matched:
        chosen = choose(setup, stored, ROBUST, s, k, seed)
        if plans_dir is not None:
            plans_dir.mkdir(parents=True, exist_ok=True)
            chosen.plan.save(plans_dir / f"{name}-{round(s * 100)}.json")
        result = test.evaluate(chosen.plan, prescreen=False)
        out["matched"].append(metrics_row(name, chosen.plan.sparsity, result.metrics, result.seconds)
                              | {"requested": s, "layer_sparsities": chosen.plan.layer_sparsities()})
    if do_sweep:
        for line, ws in sweeps().items():
            for w in ws:
                chosen = choose(setup, stored, w, None, k, seed)
                result = test.evaluate(chosen.plan, prescreen=False)
                o = result.objectives
                out["sweep"].append({"line": line, "w": list(w), "sparsity": chosen.plan.sparsity,
                                     "utility": o.utility, "robustness": o.robustness, "compression": o.compression,
                                     **metrics_row(name, chosen.plan.sparsity, result.metrics)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--preferences-per-step", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--sparsities", default="0.3,0.4,0.5,0.6", help="matched sparsities (baselines also at 0.2)")
    parser.add_argument("--ablation-steps", type=int, default=18)
    parser.add_argument("--search-limit", type=int, default=120, help="POPE questions per split / SQA at search")
    parser.add_argument("--test-limit", type=int, default=600)
    parser.add_argument("--samples", type=int, default=8, help="plans sampled per query (plus the mean plan)")
    parser.add_argument("--policy", type=Path, help="use this trained policy instead of training one")
    parser.add_argument("--ship", type=Path,
                        help="save the trained policy here (e.g. worker/hipp/policy/shipped/testbed)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="testbed", help="a testbed-world model (default: the shipped testbed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=CACHE / "hipp_vs_baselines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reporter = TqdmReporter()
    loaded = load_model(args.model)
    samples = default_samples(args.model, 64, args.seed)
    search = testbed_search_set(CACHE / "testbed-search", limit=args.search_limit)
    setup = prepare_search(loaded, search, samples, s_max=S_MAX, reporter=reporter)
    matched = [float(x) for x in args.sparsities.split(",")]
    grpo = GRPOConfig(steps=args.steps, preferences_per_step=args.preferences_per_step,
                      group_size=args.group_size, lr=args.lr, seed=args.seed,
                      matched_budgets=tuple(sorted({0.2, *matched})))
    features = setup.state.features.shape[1]
    started = time.perf_counter()
    if args.policy:
        stored = load_policy_dir(args.policy)
    else:
        stored = train_policy(setup, args.ship or args.work / "policy", PolicyConfig(features, s_max=S_MAX), grpo,
                              resume=False, reporter=reporter,
                              extra_meta={"trained_by": "python -m bench.hipp_vs_baselines"})
    training = dict(stored.meta["training"])
    training["bench_seconds"] = time.perf_counter() - started

    test = PlanEvaluator(loaded, test_set(args.test_limit), s_max=S_MAX, reporter=reporter)
    budgets = sorted({0.2, *matched, *FRONT_ONLY})
    baselines = evaluate_baselines(loaded, test, samples, budgets, seed=args.seed, reporter=reporter)
    base_rows = [metrics_row(n, p.sparsity, r.metrics, r.seconds) | {"requested": s} for n, s, p, r in baselines]
    base_points: dict[str, list[tuple[float, float, float]]] = {}
    for n, _, _, r in baselines:
        o = r.objectives
        base_points.setdefault(n, []).append((o.utility, o.robustness, o.compression))

    results = [run_policy("hipp", setup, test, stored, args.samples, args.seed, matched, True, PLANS)]
    if not args.no_ablations:
        variants = {
            "hipp-no-visual": dict(drop_visual=True, config=PolicyConfig(features, s_max=S_MAX),
                                   lam=grpo.lambda_stability),
            "hipp-no-stability": dict(drop_visual=False, config=PolicyConfig(features, s_max=S_MAX), lam=0.0),
            "hipp-flat": dict(drop_visual=False, config=PolicyConfig(features, s_max=S_MAX, flat=True),
                              lam=grpo.lambda_stability),
        }
        for name, v in variants.items():
            cfg = GRPOConfig(**{**grpo.__dict__, "steps": args.ablation_steps, "lambda_stability": v["lam"]})
            variant = train_policy(setup, args.work / name, v["config"], cfg, drop_visual=v["drop_visual"],
                                   resume=False, reporter=reporter)
            results.append(run_policy(name, setup, test, variant, args.samples, args.seed, matched, False)
                           | {"training": variant.meta["training"]})

    hipp = results[0]
    hipp_points = [(p["utility"], p["robustness"], p["compression"]) for p in hipp["sweep"]]
    hv = {"hipp": hypervolume(hipp_points)} | {n: hypervolume(p) for n, p in base_points.items()}
    best_base = max((v for k, v in hv.items() if k != "hipp"), default=0.0)
    rho = {line: spearman([p["w"][1] for p in hipp["sweep"] if p["line"] == line],
                          [p["pope_bacc"] for p in hipp["sweep"] if p["line"] == line]) for line in sweeps()}

    rows = []
    for s in matched:
        for r in base_rows:
            if r["requested"] == s:
                rows.append([s, r["baseline"], r["sparsity"], r["random_bacc"], r["popular_bacc"],
                             r["adversarial_bacc"], r["pope_bacc"],
                             f"{r['random_yes']}/{r['popular_yes']}/{r['adversarial_yes']}", r["sqa"]])
        for res in results:
            r = next(m for m in res["matched"] if m["requested"] == s)
            rows.append([s, res["name"], r["sparsity"], r["random_bacc"], r["popular_bacc"], r["adversarial_bacc"],
                         r["pope_bacc"], f"{r['random_yes']}/{r['popular_yes']}/{r['adversarial_yes']}", r["sqa"]])
    header = ["target", "plan", "sparsity", "POPE rand", "POPE pop", "POPE adv", "POPE mean", "yes r/p/a", "SQA"]
    dense = test.dense_metrics
    ratio = hv["hipp"] / best_base if best_base else float("nan")
    rhos = ", ".join(f"{v:.3f} ({k})" for k, v in rho.items())
    summary = (
        f"Dense: POPE mean balanced accuracy {PlanEvaluator.pope_balanced_accuracy(dense):.4f}, "
        f"SQA {dense['scienceqa']['accuracy']:.4f}. Test: {test.evalset.size()} questions per plan.\n\n"
        f"Hypervolume (U,H,C): HiPP {hv['hipp']:.4f} vs best baseline {best_base:.4f} (ratio {ratio:.3f}); "
        f"Spearman(w_robustness, POPE) = {rhos}; training {training['wall_seconds']:.0f} s, "
        f"{training['plan_evaluations']} plan evaluations ({training['seconds_per_evaluation']:.2f} s each).\n\n"
    )
    sweep_rows = [[p["line"], f"{p['w'][0]:.2f},{p['w'][1]:.2f},{p['w'][2]:.2f}", round(p["sparsity"], 3),
                   p["pope_bacc"], p["sqa"], round(p["utility"], 3), round(p["robustness"], 3),
                   round(p["compression"], 3)]
                  for p in hipp["sweep"]]
    md = (summary + markdown_table(header, rows) + "\n\nPreference sweep (free budget):\n\n"
          + markdown_table(["line", "w (U,R,C)", "sparsity", "POPE mean", "SQA", "U", "H", "C"], sweep_rows))
    data = {"dense": dense, "baselines": base_rows, "policies": results, "hypervolume": hv,
            "hypervolume_ratio": ratio if best_base else None, "spearman": rho,
            "training": training, "policy_id": stored.id}
    write_report("hipp_vs_baselines", data, md)
    _plot(hipp["sweep"], base_rows, Path(__file__).parent / "results" / "hipp_front.png")
    print(json.dumps({"hypervolume_ratio": data["hypervolume_ratio"], "spearman": rho}))


def _plot(sweep_points: list[dict[str, Any]], base_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in ((axes[0], "pope_bacc", "POPE balanced accuracy (mean of splits)"),
                           (axes[1], "sqa", "ScienceQA accuracy")):
        for name in sorted({r["baseline"] for r in base_rows}):
            pts = sorted((r["sparsity"], r[key]) for r in base_rows if r["baseline"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", label=name, alpha=0.6)
        for line, marker in zip(sorted({p["line"] for p in sweep_points}), "os^", strict=False):
            pts = [(p["sparsity"], p[key]) for p in sweep_points if p["line"] == line]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=45, zorder=3,
                       label=f"HiPP sweep ({line})")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    for line, marker in zip(sorted({p["line"] for p in sweep_points}), "os^", strict=False):
        pts = [(p["w"][1], p["pope_bacc"]) for p in sweep_points if p["line"] == line]
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=line)
    axes[2].set_xlabel("w_robustness")
    axes[2].set_ylabel("POPE balanced accuracy of the chosen plan")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
