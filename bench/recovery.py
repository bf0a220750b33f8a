"""Post-pruning recovery on the testbed: POPE balanced accuracy and ScienceQA accuracy before and after each method.

For each sparsity (uniform Wanda-sp plans, plus any saved plan given with ``--plan NAME=PATH``, e.g. a HiPP
policy's plan): prune the dense testbed model, evaluate it, then for each recovery method (lora, kd, lora+kd)
recover a copy on the world's training split within the time budget and evaluate again. Reported per run: the
metrics, recovery wall time and steps, and the share of the pruning loss that was recovered,
``(after - pruned) / (dense - pruned)``. The issue's target: at least half of the POPE balanced accuracy and of
the ScienceQA accuracy lost at 40%, in at most 3 minutes on 2 cores.

    python -m bench.recovery                         # the shipped testbed, 40% and 60%, all methods
    python -m bench.recovery --seconds 60 --limit 600 --methods lora   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import markdown_table, write_report
from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.evaluation.runner import evaluate
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan
from worker.hipp.recovery.conversations import world_conversations
from worker.hipp.recovery.training import METHODS, RecoveryConfig, recover
from worker.hipp.testbed.data import DEFAULT_SEED, POPE_IMAGES, SQA_SIZES, write_benchmarks


def headline(result: dict[str, Any]) -> dict[str, float]:
    """Mean POPE balanced accuracy over the splits, per-split values, and ScienceQA accuracy."""
    pope = result["pope"]
    out = {f"pope_{split}": m["balanced_accuracy"] for split, m in pope.items()}
    out["pope_bacc"] = sum(m["balanced_accuracy"] for m in pope.values()) / len(pope)
    out["pope_yes_ratio"] = sum(m["yes_ratio"] for m in pope.values()) / len(pope)
    out["sqa"] = result["scienceqa"]["accuracy"]
    return out


def recovered_share(dense: float, pruned: float, after: float) -> float | None:
    lost = dense - pruned
    return None if lost <= 1e-9 else (after - pruned) / lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="the dense model (default: the shipped testbed)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=PATH",
                        help="also recover a saved plan (e.g. a HiPP policy's); repeatable")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seconds", type=float, default=150.0, help="recovery wall-clock budget per run")
    parser.add_argument("--steps", type=int, default=None, help="step budget (default: the time budget alone)")
    parser.add_argument("--samples", type=int, default=4000, help="training conversations from the world")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--ce-weight", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many questions per split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--note", default="", help="a line for the report (e.g. which checkpoint was used)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory()
    data = Path(tmp.name)
    write_benchmarks(data, DEFAULT_SEED, POPE_IMAGES, {"test": SQA_SIZES["test"]})

    def measure(loaded: LoadedModel) -> dict[str, float]:
        result = evaluate(loaded.model, loaded.processor, data / "pope", data / "scienceqa", batch_size=64,
                          limit=args.limit)
        return headline(result)

    dense = load_model(args.model)
    dense_metrics = measure(dense)
    print(f"dense: {fmt(dense_metrics)}", flush=True)
    # Calibration (for Wanda-sp) and recovery both draw from the world's training split, never the test images.
    conversations = world_conversations(args.samples, seed=args.seed)
    calibration = [CalibrationSample(c.load_image(), c.turns[0][0]) for c in conversations[:64]]  # type: ignore[arg-type]

    plans: list[tuple[str, PruningPlan]] = []
    for sparsity in args.sparsities:
        plans.append((f"uniform wanda-sp {sparsity:.0%}",
                      build_plan(dense, sparsity, "wanda-sp", "uniform", samples=calibration, seed=args.seed)))
    for spec in args.plan:
        name, _, path = spec.partition("=")
        plans.append((name, PruningPlan.load(path)))

    runs: list[dict[str, Any]] = []
    for name, plan in plans:
        pruned = copy.deepcopy(dense)
        apply_plan(pruned.adapter, plan)
        before = measure(pruned)
        print(f"{name} pruned: {fmt(before)}", flush=True)
        row: dict[str, Any] = {"plan": name, "sparsity": plan.sparsity, "fingerprint": plan.fingerprint,
                               "pruned": before, "methods": {}}
        for method in args.methods:
            student = copy.deepcopy(pruned)
            config = RecoveryConfig(
                method=method, steps=args.steps, max_seconds=args.seconds, learning_rate=args.lr,
                batch_size=args.batch_size, lora_rank=args.rank, ce_weight=args.ce_weight,
                hidden_weight=args.hidden_weight if method != "lora" else 0.0, seed=args.seed,
            )
            start = time.perf_counter()
            result = recover(student, conversations, config, teacher=dense if config.needs_teacher else None)
            wall = time.perf_counter() - start
            after = measure(student)
            share = {k: recovered_share(dense_metrics[k], before[k], after[k]) for k in ("pope_bacc", "sqa")}
            row["methods"][method] = {
                "metrics": after, "recovered_share": share, "wall_seconds": round(wall, 1),
                "recovery": result.record(config, teacher=args.model if config.needs_teacher else None,
                                          data=f"world training split ({args.samples})"),
            }
            print(f"{name} {method}: {fmt(after)} recovered {share} in {wall:.0f}s ({result.steps} steps)",
                  flush=True)
        runs.append(row)
    tmp.cleanup()

    markdown = render(dense_metrics, runs)
    if args.note:
        markdown = f"**Note:** {args.note}\n\n" + markdown
    write_report("recovery", {"model": args.model, "note": args.note, "dense": dense_metrics, "runs": runs,
                              "args": vars(args) | {"out": str(args.out) if args.out else None}}, markdown, args.out)


def fmt(m: dict[str, float]) -> str:
    return f"POPE bal.acc {m['pope_bacc']:.3f} (yes {m['pope_yes_ratio']:.2f}), SQA {m['sqa']:.3f}"


def render(dense: dict[str, float], runs: list[dict[str, Any]]) -> str:
    header = ["plan", "method", "POPE bal.acc", "random", "popular", "adversarial", "SQA", "recovered POPE",
              "recovered SQA", "wall s", "steps"]
    rows: list[list[Any]] = [["dense", "-", dense["pope_bacc"], dense["pope_random"], dense["pope_popular"],
                              dense["pope_adversarial"], dense["sqa"], "-", "-", "-", "-"]]
    for run in runs:
        p = run["pruned"]
        rows.append([run["plan"], "none (pruned)", p["pope_bacc"], p["pope_random"], p["pope_popular"],
                     p["pope_adversarial"], p["sqa"], "-", "-", "-", "-"])
        for method, m in run["methods"].items():
            a, share = m["metrics"], m["recovered_share"]
            rows.append([run["plan"], method, a["pope_bacc"], a["pope_random"], a["pope_popular"],
                         a["pope_adversarial"], a["sqa"], _pct(share["pope_bacc"]), _pct(share["sqa"]),
                         m["wall_seconds"], m["recovery"]["steps"]])
    notes = ("Recovered = (after - pruned) / (dense - pruned): the share of the pruning loss won back. "
             "POPE bal.acc is the mean over the three splits. Recovery data: the world's training split; "
             "evaluation: the held-out testbed benchmark files.")
    return markdown_table(header, rows) + "\n\n" + notes


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
