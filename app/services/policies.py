"""Policy operations behind the routes: register one by ``uri``, or train one as a job.

Training reuses the job machinery: one transaction inserts a ``train_policy`` job (queued, on the GPU queue
like any job: claim, lease, heartbeat, events, progress, cancel, retry, resume) and the policy row
(``training``, with the job's id). The row ends with its job, in the same transaction as the job's final
status (:func:`end_training`): ``ready`` with its ``uri`` when the job succeeded, else ``failed`` or
``cancelled``; a policy is never usable half-trained.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ApiError, not_found
from app.modelrefs import check_model_ref, check_policy_uri, is_testbed
from app.models import Job, JobKind, JobStatus, Policy, PolicyStatus
from app.schemas import PolicyCreate, PolicyTrainOptions
from app.security import Principal
from app.services.job_data import reference
from app.services.jobs import TenantLocks, check_quota

#: What a training job's final status makes of its policy.
POLICY_END = {
    JobStatus.succeeded.value: PolicyStatus.ready.value,
    JobStatus.failed.value: PolicyStatus.failed.value,
    JobStatus.cancelled.value: PolicyStatus.cancelled.value,
}


def register_policy(session: Session, settings: Settings, who: Principal, body: PolicyCreate) -> Policy:
    uri = check_policy_uri(body.uri, settings) if body.uri is not None else None
    policy = Policy(
        tenant_id=who.tenant_id,
        name=body.name,
        model=body.model,
        fingerprint=body.fingerprint,
        uri=uri,
        metrics=body.metrics,
        meta=body.metadata,
        status=PolicyStatus.ready.value,
    )
    session.add(policy)
    session.commit()
    return policy


def create_training(
    session: Session, settings: Settings, locks: TenantLocks, who: Principal, body: PolicyCreate
) -> tuple[Policy, Job]:
    """The ``training`` policy and its queued ``train_policy`` job, committed together (the caller enqueues the
    job after the commit). The job counts against the tenant's active-job quota like any other."""
    train = body.train
    assert train is not None
    model = check_model_ref(body.model, settings)
    search = search_data(session, who, train, model)
    policy_id = uuid.uuid4()
    options: dict[str, Any] = {
        "train": train.model_dump(mode="json", exclude={"search"}),
        "calibration": {"samples": train.calibration_samples},
        "policy": {"id": str(policy_id)},  # where the worker stores the trained policy
    }
    if search:
        options["data"] = {"search": search}
    with locks.hold(session, who):
        check_quota(session, settings, who)
        job = Job(
            id=uuid.uuid4(),
            tenant_id=who.tenant_id,
            kind=JobKind.train_policy.value,
            model=model,
            preference={},
            options=options,
            meta=body.metadata,
            status=JobStatus.queued.value,
            max_attempts=settings.max_attempts,
            stage_outputs={},
        )
        session.add(job)
        session.flush()  # the policy row references the job
        policy = Policy(
            id=policy_id,
            tenant_id=who.tenant_id,
            name=body.name,
            model=model,
            status=PolicyStatus.training.value,
            job_id=job.id,
            train=train.model_dump(mode="json"),
            metrics={},
            meta=body.metadata,
        )
        session.add(policy)
        session.commit()
    return policy, job


def search_data(session: Session, who: Principal, train: PolicyTrainOptions, model: str) -> dict[str, Any]:
    """The checked search data sets (``options["data"]["search"]``, as a pruning job's ``data.search``); none
    named is only allowed for the testbed family, whose synthetic world has a search split."""
    found: dict[str, Any] = {}
    for kind in ("pope", "scienceqa"):
        ident = getattr(train.search, kind) if train.search is not None else None
        if ident is not None:
            found[kind] = reference(session, who, f"train.search.{kind}", ident, kind)
    if not found and not is_testbed(model):
        raise ApiError(
            422, "search_needs_data",
            f"train.search: {model!r} is not the testbed, so its plans must be scored on benchmarks of its own "
            "distribution: upload POPE and/or ScienceQA data sets (POST /datasets) and name them in "
            "train.search.pope / train.search.scienceqa",
            detail={"field": "train.search"},
        )
    return found


def end_training(session: Session, job_id: uuid.UUID, job_status: str, values: dict[str, Any] | None = None) -> None:
    """In the caller's transaction: the training policy of job ``job_id`` follows the job's final status
    (``values``: the row's ``uri``, ``fingerprint`` and ``metrics`` when it succeeded). A no-op for a job
    that trains no policy."""
    target = POLICY_END.get(job_status)
    if target is None:
        return
    session.execute(
        update(Policy)
        .where(Policy.job_id == job_id, Policy.status == PolicyStatus.training.value)
        .values(status=target, **(values or {}))
    )


def list_policies(session: Session, who: Principal, model: str | None, status: str | None) -> list[Policy]:
    q = select(Policy).where(Policy.tenant_id == who.tenant_id)
    if model is not None:
        q = q.where(Policy.model == model)
    if status is not None:
        q = q.where(Policy.status == status)
    return list(session.scalars(q.order_by(Policy.created_at.desc())))


def get_policy(session: Session, who: Principal, policy_id: uuid.UUID) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.id == policy_id, Policy.tenant_id == who.tenant_id))
    if policy is None:
        raise not_found("policy", policy_id)
    return policy
