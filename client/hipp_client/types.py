"""Typed results of the API's answers: ``Job``, ``Event``, ``Artifact``, ``Plan``, ``Policy`` and a ``Page``.

Each is built from the JSON with ``from_json``. A field the client does not know is ignored (a newer server
may add fields) and kept with every other in ``raw``, the answer as it came; optional fields the server leaves
out get their defaults, so an older server's answer reads too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _required_time(data: dict[str, Any], key: str) -> datetime:
    parsed = _time(data.get(key))
    if parsed is None:
        raise ValueError(f"{key}: expected an ISO 8601 time, got {data.get(key)!r}")
    return parsed


@dataclass(frozen=True)
class JobError:
    code: str
    message: str
    retryable: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobError:
        return cls(str(data["code"]), str(data["message"]), bool(data.get("retryable", False)))


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    stage: str | None
    progress: float
    stage_progress: float
    model: str
    preference: dict[str, float]
    target_sparsity: float | None
    options: dict[str, Any]
    metadata: dict[str, Any]
    attempt: int
    max_attempts: int
    error: JobError | None
    result: dict[str, Any] | None
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    #: ``prune`` (POST /jobs) or ``train_policy`` (a policy's training, POST /policies with ``train``).
    kind: str = "prune"

    @property
    def finished(self) -> bool:
        """The job has ended (succeeded, failed or cancelled) and will not change again."""
        return self.status in TERMINAL

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The result's metrics (parameters, evaluation), once the job has them."""
        metrics = (self.result or {}).get("metrics")
        return metrics if isinstance(metrics, dict) else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            stage=data.get("stage"),
            progress=float(data.get("progress") or 0.0),
            stage_progress=float(data.get("stage_progress") or 0.0),
            model=str(data.get("model", "")),
            preference=dict(data.get("preference") or {}),
            target_sparsity=data.get("target_sparsity"),
            options=dict(data.get("options") or {}),
            metadata=dict(data.get("metadata") or {}),
            attempt=int(data.get("attempt") or 0),
            max_attempts=int(data.get("max_attempts") or 0),
            error=JobError.from_json(error) if isinstance(error, dict) else None,
            result=data.get("result"),
            created_at=_time(data.get("created_at")),
            updated_at=_time(data.get("updated_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            heartbeat_at=_time(data.get("heartbeat_at")),
            raw=data,
            kind=str(data.get("kind") or "prune"),
        )


@dataclass(frozen=True)
class Event:
    id: int
    created_at: datetime
    level: str
    stage: str | None
    message: str
    data: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(
            id=int(data["id"]),
            created_at=_required_time(data, "created_at"),
            level=str(data.get("level", "info")),
            stage=data.get("stage"),
            message=str(data.get("message", "")),
            data=dict(data.get("data") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Artifact:
    """A stored file of a job. ``url`` is signed for a while (``expires_at``): list the artifacts again for a
    fresh one."""

    id: str
    kind: str
    name: str
    size: int
    sha256: str
    content_type: str
    url: str
    expires_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(
            id=str(data["id"]),
            kind=str(data.get("kind", "")),
            name=str(data["name"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            content_type=str(data.get("content_type", "application/octet-stream")),
            url=str(data["url"]),
            expires_at=_time(data.get("expires_at")),
            raw=data,
        )


@dataclass(frozen=True)
class Plan:
    """A plan the job considered (the non-dominated set); ``chosen`` flags the one it pruned with."""

    chosen: bool
    source: str
    plan: dict[str, Any]
    metrics: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            chosen=bool(data.get("chosen", False)),
            source=str(data.get("source", "")),
            plan=dict(data.get("plan") or {}),
            metrics=dict(data.get("metrics") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Policy:
    id: str
    name: str
    model: str
    fingerprint: str | None
    uri: str | None
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    #: training | ready | failed | cancelled (a registered policy is ready at once).
    status: str = "ready"
    #: The job that trains (trained) it; None for a registered policy.
    job_id: str | None = None
    #: Its training options, for a trained policy.
    train: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            model=str(data["model"]),
            fingerprint=data.get("fingerprint"),
            uri=data.get("uri"),
            metrics=dict(data.get("metrics") or {}),
            metadata=dict(data.get("metadata") or {}),
            created_at=_time(data.get("created_at")),
            raw=data,
            status=str(data.get("status") or "ready"),
            job_id=str(data["job_id"]) if data.get("job_id") else None,
            train=data.get("train"),
        )


@dataclass(frozen=True)
class Dataset:
    """A dataset: ``state`` uploading | validating | ready | invalid; ``source`` upload | s3; ``counts``,
    ``sha256`` and ``size`` once validated, ``reasons`` when invalid; ``raw["upload"]``: the upload target while
    uploading (read by ``upload_dataset``, not a field: it is in the answer to POST /datasets only)."""

    id: str
    kind: str
    name: str
    state: str
    counts: dict[str, Any]
    reasons: list[str]
    sha256: str | None
    size: int | None
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    source: str = "upload"
    updated_at: datetime | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        return cls(
            id=str(data["id"]),
            kind=str(data["kind"]),
            name=str(data["name"]),
            state=str(data["state"]),
            counts=dict(data.get("counts") or {}),
            reasons=[str(r) for r in data.get("reasons") or []],
            sha256=data.get("sha256"),
            size=data.get("size"),
            created_at=_time(data.get("created_at")),
            raw=data,
            source=str(data.get("source") or "upload"),
            updated_at=_time(data.get("updated_at")),
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_cursor`` back for the next one (``None``: this was the last)."""

    items: list[T]
    next_cursor: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)
