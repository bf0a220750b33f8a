"""``hipp sensitivity``, ``hipp baselines``, ``hipp policy train|list`` and ``hipp plan``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from worker.hipp.errors import OptionError


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name, local directory or hub id")
    p.add_argument("--pope", type=Path, help="POPE folder for evaluation (default for testbed: generated)")
    p.add_argument("--sqa", type=Path, help="ScienceQA folder for evaluation (default for testbed: generated)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per POPE split / SQA")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hipp" / "search")
    p.add_argument("--quiet", action="store_true")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("sensitivity", help="attention-flow visual sensitivity per layer (table + plot)")
    s.add_argument("--model", required=True)
    s.add_argument("--calibration-samples", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot", type=Path, default=Path("sensitivity.png"))
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=run_sensitivity)

    b = sub.add_parser("baselines", help="every baseline allocator at the given sparsities (table + plot)")
    _common(b)
    b.add_argument("--sparsity", default="0.2,0.3,0.4,0.5", help="comma-separated sparsities")
    b.add_argument("--allocations", default="uniform,owl,flap,random,visual", help="allocators to include")
    b.add_argument("--plot", type=Path, default=Path("baselines.png"))
    b.add_argument("--json", type=Path, help="also write the results as JSON here")
    b.set_defaults(func=run_baselines)

    p = sub.add_parser("policy", help="train or list HiPP policies")
    psub = p.add_subparsers(dest="policy_command", required=True)
    t = psub.add_parser("train", help="train a policy with plan-level GRPO")
    _common(t)
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--group-size", type=int, default=6)
    t.add_argument("--preferences-per-step", type=int, default=4)
    t.add_argument("--s-max", type=float, default=0.6)
    t.add_argument("--out", type=Path, help="policy directory (default: the user policy store)")
    t.add_argument("--no-visual", action="store_true", help="ablation: drop the visual-sensitivity features")
    t.add_argument("--flat", action="store_true", help="ablation: flat per-layer policy")
    t.add_argument("--lambda-stability", type=float, default=0.1)
    t.set_defaults(func=run_policy_train)
    ls = psub.add_parser("list", help="list stored policies")
    ls.set_defaults(func=run_policy_list)

    q = sub.add_parser("plan", help="sample plans from a policy for a preference; print the non-dominated ones")
    _common(q)
    q.add_argument("--policy", help="policy directory, id or model fingerprint (default: the model's own)")
    q.add_argument("--preference", required=True,
                   help="weights, e.g. utility=0.2,robustness=0.7,compression=0.1 (missing keys are 0)")
    q.add_argument("--sparsity", type=float, help="matched-sparsity mode: the requested sparsity")
    q.add_argument("--samples", type=int, default=8)
    q.add_argument("--out", type=Path, default=Path("plans.json"))
    q.add_argument("--plot", type=Path, default=Path("front.png"))
    q.set_defaults(func=run_plan)


def _reporter(args: argparse.Namespace) -> Any:
    from worker.hipp.progress import TqdmReporter

    return TqdmReporter(enabled=not args.quiet)


def evaluation_set(args: argparse.Namespace) -> Any:
    from worker.hipp.evaluation.plan_evaluator import EvalSet

    if args.pope or args.sqa:
        return EvalSet.from_dirs(args.pope, args.sqa, sqa_split="val", limit=args.limit, seed=args.seed)
    from worker.hipp.models.builtin import is_testbed

    if is_testbed(args.model):
        from worker.hipp.policy.search import testbed_search_set

        return testbed_search_set(args.cache_dir / "testbed-data", limit=args.limit)
    raise OptionError("give --pope DIR and/or --sqa DIR (evaluation data is only generated for the testbed)")


def run_sensitivity(args: argparse.Namespace) -> int:
    from worker.hipp.calibration_source import default_samples
    from worker.hipp.models.loading import load_model
    from worker.hipp.plots import plot_sensitivity
    from worker.hipp.sensitivity import compute_visual_sensitivity

    loaded = load_model(args.model)
    samples = default_samples(args.model, args.calibration_samples, args.seed)
    result = compute_visual_sensitivity(loaded, samples, reporter=_reporter(args))
    plot_sensitivity(result, args.plot, title=f"{args.model}: visual sensitivity")
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(f"{'layer':>5} {'direct':>8} {'rollout':>8} {'increment':>9} {'score':>6}")
    for i, (d, r, inc, v) in enumerate(zip(result.direct, result.rollout, result.increment, result.normalized(),
                                           strict=True)):
        print(f"{i:>5} {d:>8.3f} {r:>8.3f} {inc:>9.3f} {v:>6.2f}")
    print(f"plot: {args.plot}")
    return 0


def run_baselines(args: argparse.Namespace) -> int:
    from worker.hipp.calibration_source import default_samples
    from worker.hipp.evaluation.baseline_grid import ALL_BASELINES, evaluate_baselines, metrics_row
    from worker.hipp.evaluation.plan_evaluator import PlanEvaluator
    from worker.hipp.models.loading import load_model

    sparsities = _floats(args.sparsity, "--sparsity")
    allocations = [a.strip() for a in args.allocations.split(",") if a.strip()]
    baselines = [b for b in ALL_BASELINES if b.split("/")[0] in allocations]
    reporter = _reporter(args)
    loaded = load_model(args.model)
    evaluator = PlanEvaluator(loaded, evaluation_set(args), reporter=reporter)
    samples = default_samples(args.model, args.calibration_samples, args.seed)
    results = evaluate_baselines(loaded, evaluator, samples, sparsities, baselines, args.seed, reporter)
    rows = [metrics_row("dense", 0.0, evaluator.dense_metrics)]
    rows += [metrics_row(name, plan.sparsity, r.metrics, r.seconds) for name, _, plan, r in results]
    _print_rows(rows)
    print(f"evaluation cost: {evaluator.seconds_per_plan:.2f} s per plan")
    from worker.hipp.plots import plot_baselines

    plot_baselines(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _print_rows(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k)) for k in keys))


def _search_setup(args: argparse.Namespace, s_max: float = 0.6) -> Any:
    from worker.hipp.calibration_source import default_samples
    from worker.hipp.models.loading import load_model
    from worker.hipp.policy.search import prepare_search

    loaded = load_model(args.model)
    samples = default_samples(args.model, args.calibration_samples, args.seed)
    return prepare_search(loaded, evaluation_set(args), samples, s_max=s_max, cache_dir=args.cache_dir,
                          reporter=_reporter(args))


def run_policy_train(args: argparse.Namespace) -> int:
    from worker.hipp.policy.grpo import GRPOConfig
    from worker.hipp.policy.network import PolicyConfig
    from worker.hipp.policy.search import train_policy
    from worker.hipp.policy.store import user_policy_dir

    setup = _search_setup(args, args.s_max)
    grpo = GRPOConfig(steps=args.steps, group_size=args.group_size, preferences_per_step=args.preferences_per_step,
                      lambda_stability=args.lambda_stability, seed=args.seed)
    grpo.validate()
    config = PolicyConfig(num_features=setup.state.features.shape[1], s_max=args.s_max, flat=args.flat)
    out = args.out or user_policy_dir() / f"{args.model.replace('/', '_')}-{setup.fingerprint}"
    stored = train_policy(setup, out, config, grpo, drop_visual=args.no_visual, reporter=_reporter(args))
    t = stored.meta["training"]
    print(f"policy {stored.id} for {args.model} ({setup.fingerprint}): {t['steps']} steps, "
          f"{t['plan_evaluations']} plan evaluations, {t['wall_seconds']:.0f} s -> {out}")
    return 0


def run_policy_list(args: argparse.Namespace) -> int:
    from worker.hipp.policy.store import list_policies

    for p in list_policies():
        print(f"{p['id']}  model {p.get('model_reference')} ({p.get('model_fingerprint')})  {p['path']}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from worker.hipp.plots import plot_front
    from worker.hipp.policy.search import pareto_front, sample_plans, write_candidates
    from worker.hipp.policy.store import find_policy, policy_for_model
    from worker.hipp.preference import Preference

    preference = Preference.parse(args.preference).as_list()
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise OptionError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    setup = _search_setup(args)
    stored = find_policy(args.policy) if args.policy else policy_for_model(setup.loaded.adapter)
    if stored is None:
        raise OptionError(f"no trained policy for {args.model}; train one with `hipp policy train --model "
                          f"{args.model}` or pass --policy")
    candidates = sample_plans(setup, stored, preference, args.samples, args.sparsity, args.seed,
                              reporter=_reporter(args))
    front = pareto_front(candidates)
    print(f"{len(front)} non-dominated of {len(candidates)} plans (preference {preference}):")
    print(f"{'plan':<17} {'sparsity':>8} {'utility':>8} {'robust':>8} {'compr':>8} {'stab':>6} {'return':>7}")
    for c in sorted(front, key=lambda c: -c.value):
        o = c.evaluation.objectives
        print(f"{c.plan.fingerprint:<17} {c.plan.sparsity:>8.3f} {o.utility:>8.3f} {o.robustness:>8.3f} "
              f"{o.compression:>8.3f} {o.stability:>6.3f} {c.value:>7.3f}")
    write_candidates(candidates, front, args.out)
    plot_front(candidates, front, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0
