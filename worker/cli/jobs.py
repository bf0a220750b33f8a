"""``hipp jobs submit|status|wait|download|cancel|list``: the command line of the light client, with progress.

The API calls, retries, waiting and the verified download are ``hipp_client``'s (client/hipp_client, shipped
with this project); this module parses arguments and prints. Reads ``HIPP_API_URL`` (default
http://127.0.0.1:8000) and ``HIPP_API_KEY`` (or ``--url`` / ``--key``). Imports neither torch nor the database;
``hipp_client`` is imported when a command runs, so building the parser (``hipp --help``) stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from hipp_client import HippClient, Job

# Loads an exported checkpoint in a fresh process with only torch + transformers, and prints one JSON line.
LOAD_SNIPPET = r"""
import json, sys
from pathlib import Path
from transformers import AutoModelForImageTextToText
d = Path(sys.argv[1])
m = AutoModelForImageTextToText.from_pretrained(str(d), trust_remote_code=True)
plan = json.loads((d / "hipp_plan.json").read_text())
metrics = json.loads((d / "metrics.json").read_text())
print(json.dumps({"class": type(m).__name__, "parameters": sum(p.numel() for p in m.parameters()),
                  "plan": plan["fingerprint"], "metrics": metrics}))
"""


def parse_preference(text: str) -> dict[str, float]:
    """``utility=0.5,robustness=0.3,compression=0.2`` (or a JSON object), validated and normalized here."""
    from worker.hipp.preference import Preference, PreferenceError

    try:
        return Preference.parse(text).as_dict()
    except PreferenceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_plan_reference(text: str) -> dict[str, Any]:
    """``JOB_ID:INDEX`` as the API's ``plan`` object (the server checks that the job and the index exist)."""
    job, sep, index = text.rpartition(":")
    if not sep or not job or not index.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected JOB_ID:INDEX, e.g. 3f2c...:0 (an index of the job's plans)")
    return {"job": job, "index": int(index)}


def parse_data(text: str) -> dict[str, Any]:
    """``--data``: the API's ``data`` object as JSON (the server checks the ids)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}); e.g. '{{\"recovery\": \"ID\"}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as {\"evaluation\": {\"pope\": \"ID\"}}")
    return value


def job_data(args: argparse.Namespace) -> dict[str, Any] | None:
    """``data`` from ``--data`` and the ``--data-*`` ids (which win over the same place in ``--data``)."""
    data: dict[str, Any] = dict(args.data or {})
    for place, value in (("calibration", args.data_calibration), ("recovery", args.data_recovery)):
        if value:
            data[place] = value
    for kind, value in (("pope", args.data_pope), ("scienceqa", args.data_scienceqa)):
        if value:
            data["evaluation"] = {**(data.get("evaluation") or {}), kind: value}
    return data or None


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--key`` of the service, from ``HIPP_API_URL`` / ``HIPP_API_KEY`` by default."""
    parser.add_argument("--url", default=os.environ.get("HIPP_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--key", default=os.environ.get("HIPP_API_KEY"), help="API key (default $HIPP_API_KEY)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    jobs = sub.add_parser("jobs", help="submit and follow pruning jobs on a HiPP-Prune service")
    add_service_arguments(jobs)
    js = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    p = js.add_parser("submit", help="queue a job")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--preference",
        type=parse_preference,
        help="utility=0.5,robustness=0.3,compression=0.2 (normalized by the server); required without --from-plan",
    )
    p.add_argument(
        "--from-plan",
        type=parse_plan_reference,
        metavar="JOB:INDEX",
        help="materialize plan INDEX of an earlier job's front (hipp jobs status JOB: result.plans) without "
        "searching again; same --model as that job",
    )
    p.add_argument("--target-sparsity", type=float)
    p.add_argument("--recovery-steps", type=int, default=0)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-samples", type=int, default=16, help="questions per benchmark split")
    p.add_argument("--eval-world", action="store_true",
                   help="evaluate a model other than the testbed on the synthetic world when no --data-pope / "
                   "--data-scienceqa is given (otherwise it is not evaluated)")
    p.add_argument("--data", type=parse_data, metavar="JSON",
                   help='data sets by id: {"calibration", "evaluation": {"pope", "scienceqa"}, "recovery", '
                   '"search": {"pope", "scienceqa"}} (hipp datasets list)')
    p.add_argument("--data-calibration", metavar="ID", help="an images data set to calibrate on")
    p.add_argument("--data-pope", metavar="ID", help="a pope data set to evaluate on")
    p.add_argument("--data-scienceqa", metavar="ID", help="a scienceqa data set to evaluate on")
    p.add_argument("--data-recovery", metavar="ID", help="a conversations data set to recover on")
    p.add_argument("--metadata", type=json.loads, default={}, help="JSON object")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    p.add_argument("--download", type=Path, metavar="DIR", help="with --wait: download the checkpoint here")
    p.set_defaults(func=cmd_submit)

    for name, func, helptext in (
        ("status", cmd_status, "show a job"),
        ("cancel", cmd_cancel, "cancel a job"),
    ):
        q = js.add_parser(name, help=helptext)
        q.add_argument("job_id")
        q.set_defaults(func=func)

    w = js.add_parser("wait", help="follow a job's progress until it ends")
    w.add_argument("job_id")
    w.add_argument("--timeout", type=float)
    w.set_defaults(func=cmd_wait)

    d = js.add_parser("download", help="download and verify a job's checkpoint")
    d.add_argument("job_id")
    d.add_argument("-o", "--out", type=Path, required=True)
    d.add_argument("--artifact", default="checkpoint.tar")
    d.set_defaults(func=cmd_download)

    ls = js.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--status", action="append", help="filter (repeatable)")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)


def _client(args: argparse.Namespace) -> HippClient:
    from hipp_client import HippClient

    if not args.key:
        raise SystemExit(
            "hipp: error: no API key; set HIPP_API_KEY or pass --key "
            "(create one with `hipp api-key create --tenant NAME`)"
        )
    return HippClient(args.url, args.key)


def _run(fn: Callable[[], int | None]) -> int:
    from hipp_client import HippApiError

    try:
        return int(fn() or 0)
    except HippApiError as exc:
        print(f"hipp: error: {exc}", file=sys.stderr)
        return 2


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1))


def progress_printer(stream: TextIO | None = None) -> Callable[[Job], None]:
    """A ``HippClient.wait`` callback drawing one progress line on ``stream`` (default: stderr), redrawn only
    when it changes and ended with a newline once the job has finished."""
    last: list[str] = []

    def show(job: Job) -> None:
        out = stream or sys.stderr
        line = f"{job.status:<10} {job.stage or '-':<12} {100 * job.progress:5.1f}%"
        if not last or line != last[-1]:
            bar = "#" * int(30 * job.progress)
            print(f"\r[{bar:<30}] {line}", end="", file=out, flush=True)
            last.append(line)
        if job.finished:
            print(file=out)

    return show


def _outcome(job: Job) -> dict[str, Any]:
    return {"status": job.status, "error": job.raw.get("error"), "metrics": job.metrics}


def cmd_submit(args: argparse.Namespace) -> int:
    if args.preference is None and args.from_plan is None:
        print("hipp: error: give --preference (or --from-plan JOB:INDEX to replay an earlier job's plan)",
              file=sys.stderr)
        return 2

    def go() -> int:
        c = _client(args)
        job = c.submit_job(
            args.model,
            args.preference,
            plan=args.from_plan,
            target_sparsity=args.target_sparsity,
            recovery={"steps": args.recovery_steps},
            evaluation={"enabled": not args.no_eval, "max_samples": args.eval_samples,
                        **({"world": True} if args.eval_world else {})},
            data=job_data(args),
            metadata=args.metadata,
            idempotency_key=args.idempotency_key,
        )
        print(job.id)
        if not args.wait:
            return 0
        job = c.wait(job.id, on_update=progress_printer())
        if job.status != "succeeded":
            _print(job.raw.get("error"))
            return 1
        _print(job.metrics)
        if args.download:
            print(c.download(job.id, args.download))
        return 0

    return _run(go)


def cmd_status(args: argparse.Namespace) -> int:
    return _run(lambda: _print(_client(args).get_job(args.job_id).raw))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _run(lambda: print(_client(args).cancel_job(args.job_id).status))


def cmd_wait(args: argparse.Namespace) -> int:
    def go() -> int:
        job = _client(args).wait(args.job_id, timeout=args.timeout, on_update=progress_printer())
        _print(_outcome(job))
        return 0 if job.status == "succeeded" else 1

    return _run(go)


def cmd_download(args: argparse.Namespace) -> int:
    return _run(lambda: print(_client(args).download(args.job_id, args.out, args.artifact)))


def cmd_list(args: argparse.Namespace) -> int:
    def go() -> None:
        page = _client(args).jobs_page(args.status, limit=args.limit, cursor=args.cursor)
        if args.json:
            _print(page.raw)
            return
        for j in page.items:
            created = j.raw.get("created_at")
            print(f"{j.id}  {j.status:<10} {j.stage or '-':<12} {100 * j.progress:5.1f}%  {j.model}  {created}")
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}", file=sys.stderr)

    return _run(go)
