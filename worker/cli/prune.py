"""``hipp prune`` (build a plan, slice the model, export it) and ``hipp inspect`` (show an export)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from worker.hipp.errors import OptionError
from worker.hipp.models.export_options import DEFAULT_MAX_SHARD_SIZE, DTYPE_CHOICES


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("prune", help="prune a model to a target sparsity and export it")
    p.add_argument("--model", required=True, help="built-in name, local directory or hub id")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of LM-decoder parameters to remove")
    p.add_argument("--criterion", default="wanda-sp", help="magnitude | wanda-sp | random")
    p.add_argument("--allocation", default="uniform", help="per-layer allocation (uniform, ...)")
    p.add_argument("--plan", help="replay a saved hipp_plan.json instead of building one")
    p.add_argument("--mlp-multiple", type=int,
                   help="round MLP widths to this multiple (default: the device's, 64 on CUDA, none on a CPU)")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype to prune and export in (default auto: the checkpoint's own; float16 is computed in "
                        "float32 on a CPU and still exported as float16)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest safetensors shard of the export, e.g. 5GB or 500MB")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], or auto (the GPU when there is one)")
    p.add_argument("--zero-padded", action="store_true", help="also write a stock-architecture zero-padded copy")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_prune)

    i = sub.add_parser("inspect", help="print the plan and per-layer shapes of an exported model")
    i.add_argument("path", help="directory written by `hipp prune` (or, with --fragility, a plan JSON)")
    i.add_argument("--json", action="store_true")
    i.add_argument("--plot", type=Path, help="also write a per-layer allocation plot (PNG) here")
    i.add_argument("--fragility", type=Path, metavar="TABLE",
                   help="show each layer's fragility from this table (bench/results/fragility.json) next to the plan")
    i.set_defaults(func=run_inspect)


def run_prune(args: argparse.Namespace) -> int:
    # The engine (and torch) load when a command runs, not when `hipp` builds its parser for every command.
    from worker.hipp.calibration_source import choose_calibration
    from worker.hipp.checkpoint.export import export_loaded, export_zero_padded
    from worker.hipp.job import export_dtype, resolve_device
    from worker.hipp.models.loading import dtype_name, load_model
    from worker.hipp.progress import TqdmReporter
    from worker.hipp.pruning.criteria import get_criterion
    from worker.hipp.pruning.layer_counts import validate_sparsity
    from worker.hipp.pruning.plan import PruningPlan
    from worker.hipp.pruning.planner import build_plan
    from worker.hipp.pruning.rounding import default_mlp_multiple, describe
    from worker.hipp.pruning.surgery import apply_plan

    validate_sparsity(args.sparsity)
    get_criterion(args.criterion)
    if args.mlp_multiple is not None and args.mlp_multiple < 1:
        raise OptionError("--mlp-multiple must be >= 1")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise OptionError(f"{out} exists and is not empty; choose a new --out directory")
    reporter = TqdmReporter(enabled=not args.quiet)
    start = time.perf_counter()
    reporter.stage("load", args.model)
    device = resolve_device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    mlp_multiple = args.mlp_multiple if args.mlp_multiple is not None else default_mlp_multiple(device)
    if args.plan:
        plan = PruningPlan.load(args.plan)
    else:
        calibration = choose_calibration(args.model, args.calibration_samples, seed=args.seed)
        if calibration.warning:
            reporter.log(f"warning: {calibration.warning}")
        plan = build_plan(loaded, args.sparsity, args.criterion, args.allocation, mlp_multiple,
                          samples=calibration.samples, seed=args.seed, reporter=reporter)
    reporter.stage("prune", f"slicing to plan {plan.fingerprint}")
    apply_plan(loaded.adapter, plan)
    reporter.stage("export", str(out))
    card = {"source_model": args.model}
    export_loaded(loaded, out, plan=plan, card=card, metrics={"plan": plan.summary()}, dtype=export_dtype(args.dtype),
                  max_shard_size=args.max_shard_size)
    if args.zero_padded:
        export_zero_padded(loaded.model, loaded.processor, loaded.adapter, plan, out / "zero_padded",
                           source_dir=loaded.source_dir, max_shard_size=args.max_shard_size)
    s = plan.summary()
    print(f"pruned {args.model}: sparsity {s['sparsity']:.4f} of the LM decoder "
          f"({s['model_fraction_removed']:.4f} of the model), plan {plan.fingerprint}, "
          f"{dtype_name(loaded.dtype)}, {time.perf_counter() - start:.1f}s -> {out}")
    if "rounding" in s:
        print(describe(s["rounding"]))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from worker.hipp.checkpoint.export import PLAN_FILE
    from worker.hipp.pruning.plan import PruningPlan
    from worker.hipp.pruning.rounding import describe

    path = Path(args.path)
    if args.fragility:
        from worker.cli.inspect_fragility import print_fragility

        return print_fragility(path, args.fragility, as_json=args.json)
    if not (path / PLAN_FILE).is_file():
        raise OptionError(f"{path} has no {PLAN_FILE}: not a HiPP-Prune export")
    plan = PruningPlan.load(path / PLAN_FILE)
    if args.plot:
        from worker.hipp.plots import plot_allocation

        plot_allocation(plan, args.plot, title=f"{path.name}: plan {plan.fingerprint}")
    config = json.loads((path / "config.json").read_text())
    shapes = config.get("hipp_layers") or []
    s = plan.summary()
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "config_layers": shapes}, indent=1))
        return 0
    print(f"{path}: {plan.geometry.family}, plan {plan.fingerprint}, criterion {plan.meta.get('criterion')}, "
          f"allocation {plan.meta.get('allocation')}")
    print(f"sparsity {s['sparsity']:.4f} of {s['prunable_parameters']:,} prunable parameters; "
          f"{s['model_fraction_removed']:.4f} of the whole model ({s['total_parameters']:,})")
    if "rounding" in s:
        print(describe(s["rounding"]))
    print(f"{'layer':>5} {'heads':>9} {'kv':>7} {'mlp':>13} {'sparsity':>8}")
    for i, (shape, layer) in enumerate(zip(plan.geometry.layers, s["layers"], strict=True)):
        print(f"{i:>5} {layer['heads']:>4}/{shape.num_heads:<4} {layer['kv_heads']:>3}/{shape.num_kv_heads:<3} "
              f"{layer['channels']:>6}/{shape.intermediate_size:<6} {layer['sparsity']:>8.3f}")
    return 0
