"""The testbed VLM, dense and uniformly pruned: POPE per split and ScienceQA-format accuracy.

Dense metrics on the held-out benchmark files, then a grid of uniform plans (magnitude and Wanda-sp at
20/40/60% of the LM decoder, applied with masks) with POPE balanced accuracy per split, yes-ratio and SQA
accuracy. Wanda-sp calibrates on world images with the benchmarks' prompts (a stream disjoint from the test
images). Scoring is from first-token logits; both are written to bench/results/testbed.{json,md}.

    python -m bench.testbed                      # full test sets (3,000 POPE questions per split)
    python -m bench.testbed --limit 600          # quicker, noisier
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import markdown_table, write_report
from worker.hipp.evaluation.runner import evaluate
from worker.hipp.evaluation.tasks.pope import SPLITS
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.progress import TqdmReporter
from worker.hipp.pruning.masking import apply_masks
from worker.hipp.pruning.planner import build_plan
from worker.hipp.testbed.data import DEFAULT_SEED, calibration_samples, write_benchmarks

SPARSITIES = (0.2, 0.4, 0.6)
CRITERIA = ("magnitude", "wanda-sp")


def run_eval(loaded: LoadedModel, data: Path, limit: int | None, batch_size: int) -> dict[str, Any]:
    return evaluate(
        loaded.model,
        loaded.processor,
        pope_dir=data / "pope",
        sqa_dir=data / "scienceqa",
        limit=limit,
        batch_size=batch_size,
    )


def row_of(name: str, sparsity: float, result: dict[str, Any]) -> dict[str, Any]:
    pope = result["pope"]
    return {
        "plan": name,
        "sparsity": round(sparsity, 4),
        **{f"pope_{s}_bacc": round(pope[s]["balanced_accuracy"], 4) for s in SPLITS},
        **{f"pope_{s}_yes": round(pope[s]["yes_ratio"], 4) for s in SPLITS},
        "pope_bacc_se": round(max(pope[s]["balanced_accuracy_se"] for s in SPLITS), 4),
        "sqa_acc": round(result["scienceqa"]["accuracy"], 4),
        "sqa_se": round(result["scienceqa"]["accuracy_se"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--data", type=Path, default=None, help="benchmark folder (default: written to a temp dir)")
    parser.add_argument("--limit", type=int, default=None, help="questions per POPE split / SQA problems")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples for Wanda-sp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = TqdmReporter()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        if not (data / "pope").is_dir():
            write_benchmarks(data, DEFAULT_SEED, report=report)
        loaded = load_model(args.model)
        rows = [row_of("dense", 0.0, run_eval(loaded, data, args.limit, args.batch_size))]
        samples = calibration_samples(args.calibration, DEFAULT_SEED)
        for criterion in CRITERIA:
            for sparsity in SPARSITIES:
                report.log(f"{criterion} uniform {sparsity:.0%}")
                plan = build_plan(loaded, sparsity, criterion, "uniform", samples=samples, seed=0)
                with apply_masks(loaded.adapter, plan):
                    result = run_eval(loaded, data, args.limit, args.batch_size)
                rows.append(row_of(f"{criterion} uniform", plan.sparsity, result))
    header = ["plan", "sparsity", *[f"POPE {s} bal.acc" for s in SPLITS], *[f"{s} yes" for s in SPLITS], "SQA acc"]
    table = [
        [r["plan"], r["sparsity"], *[r[f"pope_{s}_bacc"] for s in SPLITS], *[r[f"pope_{s}_yes"] for s in SPLITS],
         r["sqa_acc"]]
        for r in rows
    ]
    dense = rows[0]
    markdown = "\n".join(
        [
            f"Testbed ({args.model}), logit scoring, POPE n={args.limit or 3000}/split, SQA test "
            f"n={args.limit or 1200}. Standard errors: POPE bal.acc <= {dense['pope_bacc_se']:.3f} "
            f"(dense), SQA {dense['sqa_se']:.3f} (dense). Plans are uniform over the LM decoder, applied as masks; "
            "sparsity is the fraction of prunable decoder parameters removed.",
            "",
            markdown_table(header, table),
        ]
    )
    data_out = {"model": args.model, "limit": args.limit, "rows": rows, "seconds": round(time.time() - start, 1),
                "data_seed": DEFAULT_SEED, "calibration_samples": args.calibration}
    write_report("testbed", data_out, markdown, args.out)


if __name__ == "__main__":
    main()
