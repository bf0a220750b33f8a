"""``HippClient``: the HiPP-Prune service's HTTP API (jobs, their events, artifacts and plans; datasets and
policies through their mixins) over httpx.

Reads (GET) ride out a brief outage (connection refused or reset, 502/503/504, the server's ``Retry-After``
honoured) for ``retry_s`` seconds; ``POST /jobs`` is retried the same way only with an idempotency key (the
server then answers a repeat with the job it already made); other writes are never repeated. ``wait`` long-polls
``GET /jobs/{id}?wait=``; ``download`` streams an artifact from its signed URL and keeps it only if its SHA-256
and size match the artifact record.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from hipp_client.datasets import DatasetsMixin
from hipp_client.errors import (
    BAD_RESPONSE,
    CHECKSUM_MISMATCH,
    DOWNLOAD_FAILED,
    NO_SUCH_ARTIFACT,
    UNREACHABLE,
    WAIT_TIMEOUT,
    HippApiError,
)
from hipp_client.policies import PoliciesMixin
from hipp_client.types import Artifact, Event, Job, Page, Plan

DEFAULT_URL = "http://127.0.0.1:8000"
RETRYABLE_STATUS = frozenset({502, 503, 504})
CHUNK = 1 << 20

T = TypeVar("T")


class HippClient(DatasetsMixin, PoliciesMixin):
    """A session with one HiPP-Prune service. ``base_url`` defaults to ``$HIPP_API_URL`` (else
    ``http://127.0.0.1:8000``), ``api_key`` to ``$HIPP_API_KEY``. ``http``: an ``httpx.Client`` to send through
    instead of a new one (a proxy, custom TLS, a test transport); its base URL is used as it is."""

    #: Reads ride out a brief outage (API restarting, connection reset, 502/503/504) for this long.
    retry_s = 60.0

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry_s: float | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        url = (base_url or os.environ.get("HIPP_API_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("HIPP_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if http is None:
            http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        else:
            http.headers.update(headers)
        self.http = http
        if retry_s is not None:
            self.retry_s = retry_s
        self.long_poll_ok = True  # cleared when the server refuses our ?wait= (an older or stricter server)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HippClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, retry: bool | None = None, **kw: Any) -> Any:
        """One API call, its JSON answer; an error answer raises ``HippApiError``. ``retry`` (default: only
        for GET) rides out an outage as described in the module. For endpoints without a method here."""
        r = self.send(method, path, retry=retry, **kw)
        if r.status_code >= 400:
            raise HippApiError.from_response(r)
        if r.status_code == 204:
            return None
        try:
            return r.json()
        except ValueError:
            raise HippApiError(r.status_code, BAD_RESPONSE, f"{method} {path}: the answer is not JSON") from None

    def send(self, method: str, path: str, *, retry: bool | None = None, **kw: Any) -> httpx.Response:
        """One request, the response whatever its status (a 304 is for the caller to read)."""
        retry = method.upper() == "GET" if retry is None else retry
        deadline = time.monotonic() + self.retry_s
        delay = 0.25
        while True:
            r = None
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                if not retry or time.monotonic() + delay > deadline:
                    raise self._unreachable(exc) from exc
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
            else:
                if not (retry and r.status_code in RETRYABLE_STATUS and time.monotonic() + delay <= deadline):
                    return r
            time.sleep(_retry_after(r, delay))
            delay = min(delay * 2, 5.0)

    def _unreachable(self, exc: Exception) -> HippApiError:
        return HippApiError(None, UNREACHABLE, f"cannot reach the API at {self.http.base_url}: {exc}")

    # --- jobs -------------------------------------------------------------------------------------------
    def submit_job(
        self,
        model: str,
        preference: Mapping[str, float] | None = None,
        *,
        plan: Mapping[str, Any] | None = None,
        target_sparsity: float | None = None,
        recovery: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        calibration: Mapping[str, Any] | None = None,
        export: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a pruning job (``POST /jobs``). ``preference``: weights of utility, robustness and compression
        (the server validates and normalizes them); ``plan``: ``{"job": id, "index": i}`` replays plan ``i`` of an
        earlier job's front instead of searching (then ``preference`` may be left out); ``data``: the tenant's
        data sets by id, ``{"calibration", "evaluation": {"pope", "scienceqa"}, "recovery", "search": {...}}``
        (ids, or the ``Dataset`` objects :meth:`wait_dataset` returns); the option groups are the API's, left
        out = its defaults. With ``idempotency_key`` a repeat returns the same job, so only then is the call
        retried."""
        body: dict[str, Any] = {"model": model}
        if preference is not None:
            body["preference"] = dict(preference)
        if plan is not None:
            body["plan"] = dict(plan)
        if target_sparsity is not None:
            body["target_sparsity"] = target_sparsity
        groups = {"recovery": recovery, "evaluation": evaluation, "calibration": calibration, "export": export}
        body.update({name: dict(value) for name, value in groups.items() if value is not None})
        if data is not None:
            body["data"] = _json_ready(data)
        if metadata is not None:
            body["metadata"] = dict(metadata)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        data = self.request("POST", "/jobs", json=body, headers=headers, retry=bool(idempotency_key))
        return _typed(Job.from_json, data)

    def get_job(self, job_id: str) -> Job:
        return _typed(Job.from_json, self.request("GET", _job_path(job_id)))

    def jobs_page(
        self, status: str | Sequence[str] | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Job]:
        """One page of the tenant's jobs, newest first; ``status`` filters (several: any of them)."""
        params: list[tuple[str, str | int]] = [("limit", limit)]
        params += [("status", s) for s in ([status] if isinstance(status, str) else status or [])]
        if cursor:
            params.append(("cursor", cursor))
        return _page(self.request("GET", "/jobs", params=params), Job.from_json)

    def list_jobs(self, status: str | Sequence[str] | None = None, *, page_size: int = 100) -> Iterator[Job]:
        """Every job of the tenant (newest first), page after page as the iteration gets there."""
        cursor: str | None = None
        while True:
            page = self.jobs_page(status, limit=page_size, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel_job(self, job_id: str) -> Job:
        """Queued: cancelled at once; running: ``cancelling`` until the worker stops. Not retried."""
        return _typed(Job.from_json, self.request("POST", f"{_job_path(job_id)}/cancel"))

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its files (a queued or running one is 409 ``job_active``)."""
        self.request("DELETE", _job_path(job_id))

    def events(self, job_id: str, *, after: int | None = None) -> list[Event]:
        """The job's events in order (all pages); ``after``: only those with a larger id."""
        out: list[Event] = []
        params: dict[str, str | int] = {"limit": 1000}
        if after is not None:
            params["after"] = after
        while True:
            page = _page(self.request("GET", f"{_job_path(job_id)}/events", params=params), Event.from_json)
            out += page.items
            if not page.next_cursor:
                return out
            params = {"limit": 1000, "cursor": page.next_cursor}

    def artifacts(self, job_id: str) -> list[Artifact]:
        """The job's stored files, each with its size, SHA-256 and a signed URL minted for this answer."""
        return [_typed(Artifact.from_json, a) for a in self.request("GET", f"{_job_path(job_id)}/artifacts")]

    def plans(self, job_id: str) -> list[Plan]:
        """The plans the job considered, the chosen one flagged; empty until it has planned."""
        return [_typed(Plan.from_json, p) for p in self.request("GET", f"{_job_path(job_id)}/plans")]

    # --- waiting ----------------------------------------------------------------------------------------
    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
        long_poll: float = 25.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Follow a job until it ends and return it (whatever its outcome: check ``status``). Long-polls
        ``GET /jobs/{id}?wait=`` (one request per change of status, stage or progress, or per ``long_poll``
        seconds); against a server without long-polling it polls every ``interval`` seconds. ``on_update``
        gets each state as it arrives. Outages are ridden out as reads are; after ``timeout`` seconds:
        ``HippApiError`` ``wait_timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job, tag = self._poll(job_id, None, 0.0)
        while True:
            if on_update is not None:
                on_update(job)
            if job.finished:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise HippApiError(None, WAIT_TIMEOUT, f"job {job_id} still {job.status} after {timeout:g}s")
            if tag is None or not self.long_poll_ok:  # no long-polling on this server
                time.sleep(interval if left is None else min(interval, left))
                job, tag = self._poll(job_id, None, 0.0)
            else:
                hold = long_poll if left is None else max(min(long_poll, left), 0.1)
                job, tag = self._poll(job_id, tag, hold, job)

    def _poll(self, job_id: str, tag: str | None, wait: float, known: Job | None = None) -> tuple[Job, str | None]:
        """One ``GET /jobs/{id}`` (a long-poll when ``wait``): the job and its ETag (``None``: the server does not
        long-poll). A 304 means ``known`` is still current."""
        params = {"wait": f"{wait:g}"} if wait > 0 else {}
        headers = {"If-None-Match": tag} if tag else {}
        r = self.send("GET", _job_path(job_id), params=params, headers=headers, timeout=wait + 30)
        if r.status_code == 304 and known is not None:
            return known, r.headers.get("ETag", tag)
        if r.status_code == 422 and params:  # a server whose long-poll limit is lower: plain polling
            self.long_poll_ok = False
            return self._poll(job_id, None, 0.0)
        if r.status_code >= 400:
            raise HippApiError.from_response(r)
        return _typed(Job.from_json, r.json()), r.headers.get("ETag")

    # --- downloads --------------------------------------------------------------------------------------
    def download(self, job_id: str, dest: str | Path, name: str = "checkpoint.tar", *, unpack: bool = True) -> Path:
        """Fetch the job's artifact ``name`` into the folder ``dest`` through its signed URL, and keep it only if
        its SHA-256 and size match the artifact record (else the partial file is deleted and ``HippApiError``
        ``checksum_mismatch`` raised). A ``.tar`` is unpacked there (``unpack``) and the archive removed:
        the checkpoint folder ``dest/checkpoint`` is returned; any other artifact: its file."""
        arts = {a.name: a for a in self.artifacts(job_id)}
        if name not in arts:
            have = ", ".join(arts) or "none"
            raise HippApiError(None, NO_SUCH_ARTIFACT, f"job {job_id} has no artifact {name!r} (has: {have})")
        out_dir = Path(dest)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = fetch_verified(arts[name], out_dir / name)
        if unpack and name.endswith(".tar"):
            with tarfile.open(path) as tar:
                tar.extractall(out_dir, filter="data")
            path.unlink()
            return out_dir / "checkpoint"
        return path


def fetch_verified(artifact: Artifact, path: Path, timeout: float = 120.0) -> Path:
    """Stream ``artifact`` from its signed URL to ``path`` (through ``path.part``, renamed only once the bytes'
    SHA-256 and size match the record; deleted otherwise). The API key is not sent: the URL carries its own
    signature, and may point at another host (object storage)."""
    part = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with httpx.stream("GET", artifact.url, timeout=timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                message = f"download of {artifact.name} failed: HTTP {r.status_code} {r.read()[:200]!r}"
                raise HippApiError(r.status_code, DOWNLOAD_FAILED, message)
            with part.open("wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        if digest.hexdigest() != artifact.sha256 or size != artifact.size:
            raise HippApiError(
                None,
                CHECKSUM_MISMATCH,
                f"{artifact.name}: got {size} bytes with sha256 {digest.hexdigest()}, expected {artifact.size} bytes "
                f"with sha256 {artifact.sha256}; the file was not kept",
            )
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise HippApiError(None, DOWNLOAD_FAILED, f"download of {artifact.name} failed: {exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)
    return path


def _job_path(job_id: str) -> str:
    return f"/jobs/{quote(str(job_id), safe='')}"


def _typed(build: Callable[[dict[str, Any]], T], data: Any) -> T:
    """``build(data)``; an answer without the fields the client needs is a ``bad_response`` error."""
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise HippApiError(None, BAD_RESPONSE, f"unexpected answer from the API ({exc!r}): {str(data)[:300]}") from exc


def _page(data: Any, build: Callable[[dict[str, Any]], T]) -> Page[T]:
    try:
        items = [build(item) for item in data["items"]]
        return Page(items=items, next_cursor=data.get("next_cursor"), raw=data)
    except (KeyError, TypeError, ValueError) as exc:
        raise HippApiError(None, BAD_RESPONSE, f"unexpected answer from the API ({exc!r}): {str(data)[:300]}") from exc


def _retry_after(r: httpx.Response | None, default: float) -> float:
    """The server's ``Retry-After`` (seconds, at most 10), else ``default``."""
    if r is None:
        return default
    try:
        return min(max(float(r.headers["Retry-After"]), 0.0), 10.0)
    except (KeyError, ValueError):
        return default


def _json_ready(value: Any) -> Any:
    """``data`` with ids given as ``Dataset`` objects or UUIDs turned into their id strings."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    ident = getattr(value, "id", value)
    return str(ident) if ident is not None else None
