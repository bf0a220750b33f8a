"""Per-layer fragility of the testbed: POPE and ScienceQA drop when one query head per KV group, or 25% of the MLP
channels, is removed in one decoder layer alone.

The removed units are the least important by the engine's default criterion (Wanda-sp), calibrated on the
model's own calibration source (``calibration_source.choose_calibration``: world samples for the testbed). Plans
are applied by surgery to a fresh copy of the model and scored with the evaluation runner on the report set
``bench.baselines`` uses (the testbed's held-out test files, world seed 1234, ScienceQA ``test`` split); another
``--world-seed`` draws a fresh sample of the world instead. Drops are paired per question, with standard errors.
Writes bench/results/fragility.{json,md} and fragility.png; ``hipp inspect --fragility`` shows it next to a plan.

    python -m bench.fragility     # the committed table: 1,000 questions per POPE split + 1,000 ScienceQA, 1 thread
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import RESULTS, commit, machine, markdown_table, write_report
from worker.hipp.calibration_source import choose_calibration
from worker.hipp.evaluation.fragility import DEFAULT_CRITERION, MLP_FRACTION, FragilityResult, fragility
from worker.hipp.evaluation.plan_evaluator import EvalSet
from worker.hipp.models.loading import load_model
from worker.hipp.plots import plot_fragility
from worker.hipp.progress import TqdmReporter
from worker.hipp.testbed.data import DEFAULT_SEED, write_benchmarks

CACHE = Path.home() / ".cache" / "hipp" / "bench"


def report_set(limit: int | None, world_seed: int) -> EvalSet:
    """The testbed's test files for ``world_seed`` (the default seed's files are the ones bench.baselines uses)."""
    root = CACHE / ("testbed-test" if world_seed == DEFAULT_SEED else f"testbed-test-world{world_seed}")
    if not (root / "scienceqa" / "problems.json").is_file():
        write_benchmarks(root, seed=world_seed)
    return EvalSet.from_dirs(root / "pope", root / "scienceqa", sqa_split="test", limit=limit)


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (the committed report names no home folder)."""
    repo = Path(__file__).resolve().parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)


def interval(e: dict[str, float]) -> str:
    return f"{e['value']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]"


def level(e: dict[str, float]) -> str:
    return f"{e['value']:.3f} ± {e['se']:.3f}"


def table(result: dict[str, Any]) -> str:
    header = ["layer", "removed", "LM sparsity", "POPE bal.acc drop [95%]", "SQA drop [95%]", "POPE yes-ratio",
              "yes shift [95%]"]
    names = {"heads": "1 query head / KV group", "mlp": f"{MLP_FRACTION:.0%} MLP channels"}
    body = [[r["layer"], f"{names[r['perturbation']]} ({len(r['removed']['heads']) or len(r['removed']['channels'])})",
             round(r["sparsity"], 4), interval(r["pope_bacc_drop"]), interval(r["sqa_drop"]), level(r["pope_yes"]),
             interval(r["pope_yes_shift"])] for r in result["rows"]]
    return markdown_table(header, body)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The most fragile perturbation per kind, quoted from the table (for the report's opening lines)."""
    lines = []
    for perturbation in ("heads", "mlp"):
        rows = [r for r in result["rows"] if r["perturbation"] == perturbation]
        for key, name in (("pope_bacc_drop", "POPE"), ("sqa_drop", "SQA")):
            worst = max(rows, key=lambda r: r[key]["value"])
            rest = max((r[key]["value"] for r in rows if r is not worst), default=float("nan"))
            lines.append(f"- {perturbation}: largest {name} drop in layer {worst['layer']} "
                         f"({interval(worst[key])}); the next largest in any other layer {rest:+.3f}")
    return lines


def markdown(result: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    d = result["dense"]
    q = result["questions"]
    return "\n".join([
        f"Testbed (`{args.model}`), commit `{meta['commit']}`, machine {meta['machine']['cpu']} "
        f"({meta['machine']['torch_threads']} thread(s), cuda {meta['machine']['cuda']}); {meta['seconds']:.0f} s.",
        f"Report set: world seed {args.world_seed} test files, POPE {q['pope_random']}/{q['pope_popular']}/"
        f"{q['pope_adversarial']} questions (random/popular/adversarial), ScienceQA test {q['sqa']} problems "
        f"(`--limit {args.limit}`); logit scoring with the evaluation runner; plans applied by surgery.",
        f"Removed units: the least important by `{result['criterion']}`, calibrated on {meta['calibration_source']} "
        f"samples ({args.calibration_samples}, calibration seed {args.seed}).",
        f"Dense: POPE mean balanced accuracy {level(d['pope_bacc'])}, yes-ratio {level(d['pope_yes'])}, "
        f"ScienceQA {level(d['sqa'])} (± 1 SE).",
        "",
        "Drops are dense minus perturbed (positive = worse), paired per question, with 95% intervals; the yes "
        "shift is perturbed minus dense.",
        "",
        *summary_lines(result),
        "",
        table(result),
        "",
        f"Plot: `{meta['out']}/fragility.png`. See a plan against this table: "
        f"`hipp inspect --fragility {meta['out']}/fragility.json <export or plan.json>`.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000, help="questions per POPE split and ScienceQA problems")
    parser.add_argument("--world-seed", type=int, default=DEFAULT_SEED,
                        help=f"world seed of the report set (default {DEFAULT_SEED}: the files bench.baselines uses)")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--criterion", default=DEFAULT_CRITERION)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="testbed", help="a testbed-world model (default: the shipped testbed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reporter = TqdmReporter()
    start = time.perf_counter()
    loaded = load_model(args.model)
    calibration = choose_calibration(args.model, args.calibration_samples, seed=args.seed)
    if calibration.warning:
        reporter.log(f"warning: {calibration.warning}")
    evalset = report_set(args.limit, args.world_seed)
    result: FragilityResult = fragility(loaded, evalset, calibration.samples, args.criterion,
                                        batch_size=args.batch_size, seed=args.seed, reporter=reporter)
    data = result.to_dict()
    meta = {"commit": commit(), "machine": machine(), "seconds": time.perf_counter() - start,
            "world_seed": args.world_seed, "calibration_seed": args.seed, "calibration_source": calibration.source,
            "calibration_warning": calibration.warning, "limit": args.limit, "out": display_path(args.out)}
    plot_fragility(data["rows"], args.out / "fragility.png",
                   title=f"{args.model}: drop vs dense, one layer perturbed at a time (world seed {args.world_seed})")
    write_report("fragility", {**meta, **data}, markdown(data, args, meta), out_dir=args.out)


if __name__ == "__main__":
    main()
