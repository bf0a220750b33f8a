"""The data sets a job names (``data`` of POST /jobs), checked before anything is queued: each id is a data set
of the caller's tenant (another tenant's is answered as a missing one), ``ready``, of the kind its place needs.
The checked references, with the archive's storage key and SHA-256, are what the worker reads
(``options["data"]``); the datasets' DELETE check finds a job's data sets among those values.

Also the rule for models other than the testbed: their recovery trains on the tenant's conversations, never on
the synthetic world, so recovery without ``data.recovery`` is refused."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.modelrefs import is_testbed
from app.models import Dataset, DatasetState
from app.schemas import BenchmarkData, JobCreate
from app.security import Principal

#: The kind each place of ``data`` takes.
CALIBRATION_KIND, RECOVERY_KIND = "images", "conversations"


def resolve_job_data(session: Session, who: Principal, body: JobCreate, model: str) -> dict[str, Any] | None:
    """``options["data"]`` for ``body`` (None when it names no data set), after :func:`check_recovery_data`."""
    check_recovery_data(body, model)
    data = body.data
    if data is None:
        return None
    resolved: dict[str, Any] = {}
    if data.calibration is not None:
        resolved["calibration"] = reference(session, who, "data.calibration", data.calibration, CALIBRATION_KIND)
    for place in ("evaluation", "search"):
        pair = benchmarks(session, who, place, getattr(data, place))
        if pair:
            resolved[place] = pair
    if data.recovery is not None:
        resolved["recovery"] = reference(session, who, "data.recovery", data.recovery, RECOVERY_KIND)
    return resolved or None


def check_recovery_data(body: JobCreate, model: str) -> None:
    """A model other than the testbed recovers on the tenant's conversations only (422 without them)."""
    if body.recovery.steps <= 0 or is_testbed(model) or (body.data and body.data.recovery):
        return
    raise ApiError(
        422, "recovery_needs_data",
        f"recovery.steps: {model!r} is not the testbed, so recovery needs conversations of its own "
        "distribution: upload a conversations dataset (POST /datasets, kind conversations) and name it in "
        "data.recovery, or set recovery.steps to 0",
        detail={"field": "data.recovery"},
    )


def benchmarks(session: Session, who: Principal, place: str, pair: BenchmarkData | None) -> dict[str, Any]:
    if pair is None:
        return {}
    found = {}
    for kind in ("pope", "scienceqa"):
        ident = getattr(pair, kind)
        if ident is not None:
            found[kind] = reference(session, who, f"data.{place}.{kind}", ident, kind)
    return found


def reference(session: Session, who: Principal, field: str, ident: uuid.UUID, kind: str) -> dict[str, Any]:
    """The checked data set ``field`` names: ``{id, kind, name, sha256, size, key}``."""
    dataset = session.scalar(select(Dataset).where(Dataset.id == ident, Dataset.tenant_id == who.tenant_id))
    if dataset is None:
        raise ApiError(
            422, "invalid_data_reference",
            f"{field}: dataset {ident} does not exist (or belongs to another tenant); name one of your data "
            "sets (GET /datasets)",
            detail={"field": field, "dataset": str(ident)},
        )
    if dataset.kind != kind:
        raise ApiError(
            422, "invalid_data_reference",
            f"{field}: dataset {ident} is of kind {dataset.kind}, but {field} takes a {kind} data set; name one "
            f"of kind {kind}",
            detail={"field": field, "dataset": str(ident), "kind": dataset.kind, "expected": kind},
        )
    if dataset.state != DatasetState.ready.value or not dataset.sha256:
        todo = {
            DatasetState.uploading.value: "upload its archive and complete it, then wait until it is ready",
            DatasetState.validating.value: "wait until its validation has finished (GET /datasets/{id})",
        }.get(dataset.state, "fix what its reasons say and upload it again as a new data set")
        raise ApiError(
            409, "dataset_not_ready",
            f"{field}: dataset {ident} is {dataset.state}, only a ready data set can be used; {todo}",
            detail={"field": field, "dataset": str(ident), "state": dataset.state},
        )
    return {"id": str(dataset.id), "kind": dataset.kind, "name": dataset.name, "sha256": dataset.sha256,
            "size": dataset.size, "key": dataset.key}
