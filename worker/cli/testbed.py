"""``hipp testbed``: write the testbed benchmark files (``data``) and train the testbed VLM (``train``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from worker.hipp.progress import TqdmReporter


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("testbed", help="synthetic benchmarks and the testbed VLM")
    sub = parser.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")

    data = sub.add_parser("data", help="write POPE- and ScienceQA-format benchmark files")
    data.add_argument("--out", required=True, type=Path, help="output folder (gets pope/ and scienceqa/)")
    data.add_argument("--seed", type=int, default=None, help="world seed (default: the documented one)")
    data.add_argument("--pope-images", type=int, default=None, help="images for POPE (6 questions each)")
    data.set_defaults(func=run_data)

    card = sub.add_parser("card", help="measure an exported testbed and write its metrics.json and README.md")
    card.add_argument("--model-dir", type=Path, default=None, help="default: the shipped model/")
    card.add_argument("--summary", type=Path, required=True, help="summary.json written by `testbed train`")
    card.add_argument("--command", required=True, help="the training command(s) to document")
    card.add_argument("--notes", type=Path, default=None, help="a markdown file with notes on the training run")
    card.add_argument("--reference", default="testbed", help="the model reference the card names")
    card.add_argument("--trained-on", default=None, help="where it was trained (default: 2 CPU cores)")
    card.set_defaults(func=run_card)

    train = sub.add_parser("train", help="train the testbed VLM from scratch (CPU, about 45 minutes)")
    train.add_argument("--out", type=Path, default=None, help="export folder (default: the shipped model/)")
    train.add_argument("--work", type=Path, default=Path("runs/testbed"), help="checkpoints and log")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--stage1-steps", type=int, default=None)
    train.add_argument("--stage2-steps", type=int, default=None)
    train.add_argument("--stage1-minutes", type=float, default=None, help="wall-clock budget for stage 1")
    train.add_argument("--stage2-minutes", type=float, default=None, help="wall-clock budget for stage 2")
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--resume", default=None, help="continue stage 2 from this saved model (skips stage 1)")
    train.add_argument("--stage2-lr", type=float, default=None)
    train.add_argument("--sqa-share", type=float, default=None, help="share of ScienceQA questions in stage 2")
    train.add_argument("--images", type=int, default=None, help="training images per pool (POPE and SQA)")
    train.add_argument("--text-layers", type=int, default=None, help="decoder depth (default: the testbed's 6)")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=run_train)


def run_data(args: argparse.Namespace) -> int:
    from worker.hipp.testbed.data import DEFAULT_SEED, POPE_IMAGES, write_benchmarks

    counts = write_benchmarks(
        args.out,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        pope_images=args.pope_images or POPE_IMAGES,
        report=TqdmReporter(),
    )
    print(json.dumps(counts, indent=2))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from worker.hipp.testbed import MODEL_DIR
    from worker.hipp.testbed.train import TrainConfig, train

    cfg = TrainConfig(seed=args.seed)
    if args.stage1_steps is not None:
        cfg.stage1_steps = args.stage1_steps
    if args.stage2_steps is not None:
        cfg.stage2_steps = args.stage2_steps
        cfg.multiturn_from = min(cfg.multiturn_from, args.stage2_steps)
    cfg.stage1_minutes = args.stage1_minutes
    cfg.stage2_minutes = args.stage2_minutes
    if args.threads is not None:
        cfg.threads = args.threads
    if args.stage2_lr is not None:
        cfg.stage2_lr = args.stage2_lr
    cfg.resume = args.resume
    if args.text_layers is not None:
        cfg.text_layers = args.text_layers
    if args.sqa_share is not None:
        cfg.sqa_share = args.sqa_share
    if args.images is not None:
        cfg.pope_images = cfg.sqa_problems = args.images
    summary = train(cfg, args.out or MODEL_DIR, args.work, TqdmReporter(enabled=not args.quiet))
    print(json.dumps(summary, indent=2))
    return 0


def run_card(args: argparse.Namespace) -> int:
    from worker.hipp.testbed import MODEL_DIR
    from worker.hipp.testbed.card import write_card

    training = json.loads(args.summary.read_text())
    notes = args.notes.read_text() if args.notes else ""
    metrics = write_card(args.model_dir or MODEL_DIR, training, args.command, notes, TqdmReporter(),
                         args.reference, args.trained_on)
    from worker.hipp.evaluation.runner import format_table

    print(format_table(metrics))
    return 0
