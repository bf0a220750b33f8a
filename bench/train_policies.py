"""Train a testbed-family member's HiPP policy with the shipped recipe, or one of its ablations.

The recipe every shipped policy follows (and every ablation, with the same GRPO steps): search on the world's
validation split (120 questions per POPE split and ScienceQA), 64 calibration samples, s_max 0.8, plan-level
GRPO for 36 steps x 3 preferences x 6 plans, lr 0.01, matched budgets 0.2-0.6 for half the groups.

    python -m bench.train_policies --model testbed --out worker/hipp/policy/shipped/testbed
    python -m bench.train_policies --model testbed --variant no-visual --seed 1 --out /tmp/p
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from bench.hipp_vs_baselines import CACHE, S_MAX
from worker.hipp.calibration_source import default_samples
from worker.hipp.models.loading import load_model
from worker.hipp.policy.grpo import GRPOConfig
from worker.hipp.policy.network import PolicyConfig
from worker.hipp.policy.search import prepare_search, testbed_search_set, train_policy
from worker.hipp.policy.state import VISUAL_FEATURES
from worker.hipp.policy.store import StoredPolicy
from worker.hipp.progress import TqdmReporter

STEPS = 36
SEARCH_LIMIT = 120
CALIBRATION_SAMPLES = 64
MATCHED_BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6)
#: Ablations: what each one removes from the full policy (same recipe otherwise).
VARIANTS = ("full", "no-visual", "no-stability", "flat")


def recipe(seed: int, variant: str) -> GRPOConfig:
    return GRPOConfig(steps=STEPS, preferences_per_step=3, group_size=6, lr=0.01, seed=seed,
                      matched_budgets=MATCHED_BUDGETS, lambda_stability=0.0 if variant == "no-stability" else 0.1)


def train(model: str, out: Path, seed: int = 0, variant: str = "full", threads: int = 1) -> StoredPolicy:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    torch.set_num_threads(threads)
    reporter = TqdmReporter()
    loaded = load_model(model)
    samples = default_samples(model, CALIBRATION_SAMPLES, seed)
    search = testbed_search_set(CACHE / "testbed-search", limit=SEARCH_LIMIT)
    setup = prepare_search(loaded, search, samples, s_max=S_MAX, reporter=reporter)
    state = setup.state.without(VISUAL_FEATURES) if variant == "no-visual" else setup.state
    features = state.features.shape[1]
    config = PolicyConfig(features, s_max=S_MAX, flat=variant == "flat")
    command = "python -m bench.train_policies " + shlex.join(sys.argv[1:])
    return train_policy(setup, out, config, recipe(seed, variant), drop_visual=variant == "no-visual",
                        resume=False, reporter=reporter,
                        extra_meta={"trained_by": command, "variant": variant, "seed": seed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="a testbed-family reference")
    parser.add_argument("--out", type=Path, required=True, help="the policy directory to write")
    parser.add_argument("--seed", type=int, default=0, help="training seed (calibration draw and GRPO)")
    parser.add_argument("--variant", default="full", choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    stored = train(args.model, args.out, args.seed, args.variant, args.threads)
    t = stored.meta["training"]
    print(f"policy {stored.id} ({args.variant}, seed {args.seed}) for {args.model}: {t['steps']} steps, "
          f"{t['wall_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
