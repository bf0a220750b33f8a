"""``hipp eval``: evaluate a model reference on POPE and/or ScienceQA files and print a table or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from worker.hipp.errors import OptionError
from worker.hipp.models.export_options import DTYPE_CHOICES
from worker.hipp.progress import TqdmReporter


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("eval", help="evaluate a model on POPE / ScienceQA")
    parser.add_argument("--model", required=True, help="model reference (testbed, a folder, a hub id)")
    parser.add_argument("--pope", type=Path, default=None, help="POPE folder or llava_pope_test.jsonl")
    parser.add_argument("--sqa", type=Path, default=None, help="ScienceQA folder (problems.json, pid_splits.json)")
    parser.add_argument("--mode", choices=("logits", "generate"), default="logits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions per split")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="dtype to evaluate in (default auto: the checkpoint's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.pope is None and args.sqa is None:
        raise OptionError("give --pope DIR and/or --sqa DIR")
    from worker.hipp.evaluation.runner import evaluate, format_table
    from worker.hipp.models.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    result = evaluate(
        loaded.model,
        loaded.processor,
        pope_dir=args.pope,
        sqa_dir=args.sqa,
        mode=args.mode,
        batch_size=args.batch_size,
        limit=args.limit,
        report=TqdmReporter(enabled=not args.quiet and not args.json),
    )
    result["model"] = args.model
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
