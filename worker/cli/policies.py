"""``hipp policies train|list|show``: the service's policies through ``hipp_client``, like ``hipp jobs``.

``train`` queues a policy's training on the service (``POST /policies`` with ``train``) and, with ``--wait``,
follows its job with a progress line until the policy is ready, failed or cancelled (cancel it with ``hipp jobs
cancel JOB``). Not to be confused with ``hipp policy train``, which trains a policy in this process. Reads
``HIPP_API_URL`` and ``HIPP_API_KEY`` (or ``--url`` / ``--key``). Imports neither torch nor the database.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from worker.cli.jobs import _client, _print, _run, add_service_arguments, progress_printer


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pol = sub.add_parser("policies", help="train and list HiPP policies on a HiPP-Prune service")
    add_service_arguments(pol)
    actions = pol.add_subparsers(dest="policies_command", required=True, metavar="ACTION")

    t = actions.add_parser("train", help="train a policy for a model as a job on the service's GPU queue")
    t.add_argument("--model", required=True)
    t.add_argument("--name", help="default: '<model> policy'")
    t.add_argument("--steps", type=int, help="GRPO steps (server default 40)")
    t.add_argument("--group-size", type=int, help="plans per preference (server default 6)")
    t.add_argument("--preferences-per-step", type=int)
    t.add_argument("--budget-min", type=float, help="smallest sparsity the policy proposes")
    t.add_argument("--budget-max", type=float, help="largest sparsity the policy proposes")
    t.add_argument("--time-budget", type=float, metavar="SECONDS", dest="time_budget_s",
                   help="stop at the first step boundary after this many seconds of GRPO and keep that policy")
    t.add_argument("--seed", type=int)
    t.add_argument("--search-limit", type=int, help="questions per search benchmark split")
    t.add_argument("--calibration-samples", type=int)
    t.add_argument("--search-pope", metavar="ID", help="a pope data set to score plans on (hipp datasets list)")
    t.add_argument("--search-scienceqa", metavar="ID", help="a scienceqa data set to score plans on")
    t.add_argument("--wait", action="store_true", help="follow the training until the policy is ready")
    t.add_argument("--timeout", type=float, help="with --wait: seconds")
    t.set_defaults(func=cmd_train)

    ls = actions.add_parser("list", help="list policies, newest first")
    ls.add_argument("--model")
    ls.add_argument("--status", choices=("training", "ready", "failed", "cancelled"))
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="show a policy (status, training job, metrics)")
    show.add_argument("policy_id")
    show.set_defaults(func=cmd_show)


TRAIN_ARGS = ("steps", "group_size", "preferences_per_step", "budget_min", "budget_max", "time_budget_s", "seed",
              "search_limit", "calibration_samples")


def cmd_train(args: argparse.Namespace) -> int:
    def go() -> int:
        client = _client(args)
        options: dict[str, Any] = {name: getattr(args, name) for name in TRAIN_ARGS}
        policy = client.train_policy(args.model, args.name, search_pope=args.search_pope,
                                     search_scienceqa=args.search_scienceqa, **options)
        print(f"policy {policy.id} training in job {policy.job_id}")
        if not args.wait:
            return 0
        policy = client.wait_policy(policy, timeout=args.timeout, on_update=progress_printer())
        if policy.status != "ready" and policy.job_id is not None:
            _print({"status": policy.status, "error": client.get_job(policy.job_id).raw.get("error")})
            return 1
        _print({"id": policy.id, "status": policy.status, "uri": policy.uri, "metrics": policy.metrics})
        return 0

    return _run(go)


def cmd_list(args: argparse.Namespace) -> int:
    def go() -> None:
        policies = _client(args).list_policies(args.model, status=args.status)
        if args.json:
            _print([p.raw for p in policies])
            return
        for p in policies:
            steps = p.metrics.get("steps")
            trained = f"{steps} steps" if steps is not None else "-"
            print(f"{p.id}  {p.status:<9} {p.model:<16} {trained:<10} {p.name}", file=sys.stdout)

    return _run(go)


def cmd_show(args: argparse.Namespace) -> int:
    return _run(lambda: _print(_client(args).get_policy(args.policy_id).raw))
