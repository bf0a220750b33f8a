"""``hipp jobs submit|status|wait|download|cancel|list``: a client for the HTTP API (httpx), with progress.

Reads ``HIPP_API_URL`` (default http://127.0.0.1:8000) and ``HIPP_API_KEY`` (or ``--url`` / ``--key``).
``download`` fetches the checkpoint archive from its signed URL, checks its SHA-256 and unpacks it.
Imports neither torch nor the database.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

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

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiClientError(Exception):
    pass


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.long_poll_ok = True

    #: Reads (GET) ride out a brief outage (API restarting, connection reset, 502/503/504) for this long.
    retry_s = 60.0

    def request(self, method: str, path: str, **kw: Any) -> Any:
        r = self.send(method, path, **kw)
        if r.status_code >= 400:
            self._raise(r)
        return r.json()

    def send(self, method: str, path: str, **kw: Any) -> Any:
        """One request, the ``httpx.Response`` whatever its status; reads are retried as described above."""
        import httpx

        deadline = time.monotonic() + self.retry_s
        delay = 0.25
        retry = method.upper() == "GET"  # never repeat a write behind the caller's back
        while True:
            r = None
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                if not retry or time.monotonic() + delay > deadline:
                    raise ApiClientError(f"cannot reach the API at {self.http.base_url}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise ApiClientError(f"cannot reach the API at {self.http.base_url}: {exc}") from exc
            else:
                if not (retry and r.status_code in (502, 503, 504) and time.monotonic() + delay <= deadline):
                    break
            time.sleep(_retry_after(r, delay))
            delay = min(delay * 2, 5.0)
        return r

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")  # type: ignore[no-any-return]

    def wait(
        self,
        job_id: str,
        interval: float = 0.5,
        timeout: float | None = None,
        show: bool = True,
        long_poll: float = 25.0,
    ) -> dict[str, Any]:
        """Follow a job until it ends. Long-polls ``GET /jobs/{id}?wait=`` (one request per change of status,
        stage or progress, or per ``long_poll`` seconds); against a server without long-polling (no ``ETag``)
        it polls every ``interval`` seconds. Outages and a busy server's 503 are ridden out as by ``request``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        job, tag = self._poll(job_id, None, 0.0)
        while True:
            line = f"{job['status']:<10} {job['stage'] or '-':<12} {100 * job['progress']:5.1f}%"
            if show and line != last:
                bar = "#" * int(30 * job["progress"])
                print(f"\r[{bar:<30}] {line}", end="", file=sys.stderr, flush=True)
                last = line
            if job["status"] in TERMINAL:
                if show:
                    print(file=sys.stderr)
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ApiClientError(f"job {job_id} still {job['status']} after {timeout}s")
            if tag is None or not self.long_poll_ok:  # no long-polling on this server
                time.sleep(interval if left is None else min(interval, left))
                job, tag = self._poll(job_id, None, 0.0)
            else:
                hold = long_poll if left is None else max(min(long_poll, left), 0.1)
                job, tag = self._poll(job_id, tag, hold, job)

    def _poll(
        self, job_id: str, tag: str | None, wait: float, known: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str | None]:
        """One ``GET /jobs/{id}`` (a long-poll when ``wait``): the job and its ETag (``None``: the server does not
        long-poll). A 304 means ``known`` is still current."""
        params = {"wait": f"{wait:g}"} if wait > 0 else {}
        headers = {"If-None-Match": tag} if tag else {}
        r = self.send("GET", f"/jobs/{job_id}", params=params, headers=headers, timeout=wait + 30)
        if r.status_code == 304 and known is not None:
            return known, r.headers.get("ETag", tag)
        if r.status_code == 422 and params:  # a server whose long-poll limit is lower: plain polling
            self.long_poll_ok = False
            return self._poll(job_id, None, 0.0)
        if r.status_code >= 400:
            self._raise(r)
        return r.json(), r.headers.get("ETag")

    @staticmethod
    def _raise(r: Any) -> None:
        try:
            err = r.json()["error"]
            message = f"{err['message']} [{r.status_code} {err['code']}]"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {r.status_code}: {r.text[:300]}"
        raise ApiClientError(message)

    def download(self, job_id: str, out_dir: Path, name: str = "checkpoint.tar") -> Path:
        """Fetch an artifact through its signed URL, verify its sha256; unpack a checkpoint archive."""
        import httpx

        arts = {a["name"]: a for a in self.request("GET", f"/jobs/{job_id}/artifacts")}
        if name not in arts:
            raise ApiClientError(f"job {job_id} has no artifact {name!r} (has: {', '.join(arts) or 'none'})")
        art = arts[name]
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / name
        digest = hashlib.sha256()
        with httpx.stream("GET", art["url"], timeout=120) as r:
            if r.status_code != 200:
                raise ApiClientError(f"download failed: HTTP {r.status_code} {r.read()[:200]!r}")
            with dest.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        if digest.hexdigest() != art["sha256"]:
            dest.unlink()
            raise ApiClientError(f"sha256 mismatch for {name}: got {digest.hexdigest()}, expected {art['sha256']}")
        if name.endswith(".tar"):
            with tarfile.open(dest) as tar:
                tar.extractall(out_dir, filter="data")
            dest.unlink()
            return out_dir / "checkpoint"
        return dest


def _retry_after(r: Any, default: float) -> float:
    """The server's ``Retry-After`` (seconds, at most 10), else ``default``."""
    try:
        return min(max(float(r.headers["Retry-After"]), 0.0), 10.0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return default


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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    jobs = sub.add_parser("jobs", help="submit and follow pruning jobs on a HiPP-Prune service")
    jobs.add_argument("--url", default=os.environ.get("HIPP_API_URL", "http://127.0.0.1:8000"))
    jobs.add_argument("--key", default=os.environ.get("HIPP_API_KEY"), help="API key (default $HIPP_API_KEY)")
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


def _client(args: argparse.Namespace) -> Client:
    if not args.key:
        raise SystemExit(
            "hipp: error: no API key; set HIPP_API_KEY or pass --key "
            "(create one with `hipp api-key create --tenant NAME`)"
        )
    return Client(args.url, args.key)


def _run(fn: Any) -> int:
    try:
        return int(fn() or 0)
    except ApiClientError as exc:
        print(f"hipp: error: {exc}", file=sys.stderr)
        return 2


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1))


def cmd_submit(args: argparse.Namespace) -> int:
    if args.preference is None and args.from_plan is None:
        print("hipp: error: give --preference (or --from-plan JOB:INDEX to replay an earlier job's plan)",
              file=sys.stderr)
        return 2

    def go() -> int:
        c = _client(args)
        body: dict[str, Any] = {
            "model": args.model,
            "target_sparsity": args.target_sparsity,
            "recovery": {"steps": args.recovery_steps},
            "evaluation": {"enabled": not args.no_eval, "max_samples": args.eval_samples},
            "metadata": args.metadata,
        }
        if args.preference is not None:
            body["preference"] = args.preference
        if args.from_plan is not None:
            body["plan"] = args.from_plan
        job = c.submit(body, args.idempotency_key)
        print(job["id"])
        if not args.wait:
            return 0
        job = c.wait(job["id"])
        if job["status"] != "succeeded":
            _print(job.get("error"))
            return 1
        _print((job["result"] or {}).get("metrics"))
        if args.download:
            print(c.download(job["id"], args.download))
        return 0

    return _run(go)


def cmd_status(args: argparse.Namespace) -> int:
    return _run(lambda: _print(_client(args).job(args.job_id)))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _run(lambda: print(_client(args).request("POST", f"/jobs/{args.job_id}/cancel")["status"]))


def cmd_wait(args: argparse.Namespace) -> int:
    def go() -> int:
        job = _client(args).wait(args.job_id, timeout=args.timeout)
        _print({"status": job["status"], "error": job["error"], "metrics": (job["result"] or {}).get("metrics")})
        return 0 if job["status"] == "succeeded" else 1

    return _run(go)


def cmd_download(args: argparse.Namespace) -> int:
    return _run(lambda: print(_client(args).download(args.job_id, args.out, args.artifact)))


def cmd_list(args: argparse.Namespace) -> int:
    def go() -> None:
        params: list[tuple[str, Any]] = [("limit", args.limit)]
        params += [("status", s) for s in args.status or []]
        if args.cursor:
            params.append(("cursor", args.cursor))
        page = _client(args).request("GET", "/jobs", params=params)
        if args.json:
            _print(page)
            return
        for j in page["items"]:
            print(
                f"{j['id']}  {j['status']:<10} {j['stage'] or '-':<12} {100 * j['progress']:5.1f}%  "
                f"{j['model']}  {j['created_at']}"
            )
        if page["next_cursor"]:
            print(f"more: --cursor {page['next_cursor']}", file=sys.stderr)

    return _run(go)
