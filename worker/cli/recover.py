"""``hipp recover``: repair a pruned export with LoRA and/or distillation from the dense model, and re-export it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("recover", help="recover a pruned model (LoRA merged back, distillation) and export it")
    p.add_argument("--model", required=True, help="directory written by `hipp prune`")
    p.add_argument("--method", default="lora", help="lora | kd | lora+kd")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100 unless --seconds is set)")
    p.add_argument("--seconds", type=float, default=None, help="wall-clock budget; stops at the first budget hit")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--teacher", help="dense model for distillation (default: the model recorded in the plan)")
    p.add_argument("--data", default="world",
                   help="'world' (the benchmark world's training split) or a LLaVA-format conversations JSON")
    p.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    p.add_argument("--samples", type=int, default=2000, help="conversations drawn from the world (--data world)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 LoRA, 2e-4 kd)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default=None,
                   help="comma-separated decoder linears to train (default: every attention and MLP linear)")
    p.add_argument("--ce-weight", type=float, default=None)
    p.add_argument("--kd-weight", type=float, default=None)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state distillation weight")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_recover)


def _default_targets() -> tuple[str, ...]:
    from worker.hipp.recovery.config import LM_LINEARS

    return LM_LINEARS


def run_recover(args: argparse.Namespace) -> int:
    from worker.hipp.checkpoint.export import METRICS_FILE, PLAN_FILE, export_loaded
    from worker.hipp.errors import OptionError
    from worker.hipp.models.loading import load_model
    from worker.hipp.progress import TqdmReporter
    from worker.hipp.pruning.plan import PruningPlan
    from worker.hipp.recovery.config import RecoveryConfig
    from worker.hipp.recovery.conversations import load_llava_json, world_conversations
    from worker.hipp.recovery.training import recover

    config = RecoveryConfig(
        method=args.method,
        steps=args.steps if args.steps is not None or args.seconds is not None else 100,
        max_seconds=args.seconds,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        lora_rank=args.rank,
        lora_alpha=args.alpha,
        targets=(tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets
                 else _default_targets()),
        ce_weight=args.ce_weight,
        kd_weight=args.kd_weight,
        hidden_weight=args.hidden_weight,
        temperature=args.temperature,
        max_length=args.max_length,
        seed=args.seed,
    )
    source = Path(args.model)
    if not (source / PLAN_FILE).is_file():
        raise OptionError(f"{source} has no {PLAN_FILE}: --model must be a directory written by `hipp prune`")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise OptionError(f"{out} exists and is not empty; choose a new --out directory")
    plan = PruningPlan.load(source / PLAN_FILE)
    teacher_ref = args.teacher or plan.meta.get("model")
    if config.needs_teacher and not teacher_ref:
        raise OptionError("the plan records no source model; pass the dense model with --teacher")
    if args.data != "world" and not Path(args.data).is_file():
        raise OptionError(f"--data must be 'world' or a LLaVA-format JSON file; {args.data} does not exist")

    reporter = TqdmReporter(enabled=not args.quiet)
    start = time.perf_counter()
    reporter.stage("load", str(source))
    # Training runs in float32 whatever the checkpoint's dtype (low-precision weights lose small updates);
    # the export is written in the checkpoint's own dtype again.
    student = load_model(str(source), dtype="float32", device=args.device)
    teacher = None
    if config.needs_teacher:
        reporter.stage("load", f"teacher {teacher_ref}")
        teacher = load_model(str(teacher_ref), dtype="float32", device=args.device)
    if args.data == "world":
        conversations = world_conversations(args.samples, seed=args.seed)
        data = f"world training split ({args.samples} conversations, seed {args.seed})"
    else:
        conversations = load_llava_json(args.data, args.image_folder)
        data = f"{args.data} ({len(conversations)} conversations)"
    result = recover(student, conversations, config, teacher=teacher, reporter=reporter)

    previous_file = source / METRICS_FILE
    metrics = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    metrics["recovery"] = result.record(config, teacher=str(teacher_ref) if teacher else None, data=data)
    reporter.stage("export", str(out))
    card = {"source_model": plan.meta.get("model")}
    export_loaded(student, out, plan=plan, metrics=metrics, card=card)
    first, last = result.mean_loss(first=True), result.mean_loss(first=False)
    print(f"recovered {source} with {config.method}: {result.steps} steps in {result.seconds:.1f}s, loss "
          f"{first if first is None else round(first, 4)} -> {last if last is None else round(last, 4)}, "
          f"total {time.perf_counter() - start:.1f}s -> {out}")
    return 0
