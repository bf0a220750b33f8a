"""Policies: trained HiPP-Prune policies a job uses for its model instead of the baseline allocator, registered
by ``uri`` or trained by the service as a job (``train``)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response, status

from app.deps import (
    CurrentTenant,
    DbRoute,
    DispatcherDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    TenantLocksDep,
    rate_limit,
)
from app.metrics import JOBS_SUBMITTED
from app.schemas import PolicyCreate, PolicyOut
from app.services import policies as service

router = APIRouter(prefix="/policies", tags=["policies"], route_class=DbRoute)


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=PolicyOut, dependencies=[Depends(rate_limit("submit"))]
)
def create_policy(
    body: PolicyCreate,
    session: SessionDep,
    settings: SettingsDep,
    locks: TenantLocksDep,
    dispatcher: DispatcherDep,
    who: CurrentTenant,
    response: Response,
) -> PolicyOut:
    """Register a policy, or train one. ``uri``: a stored policy's id or model fingerprint, or a folder under
    ``HIPP_POLICY_DIRS`` / ``HIPP_MODEL_DIRS`` (anything else is 422 ``invalid_policy_uri``). ``train``: queue
    its training as a job on the GPU queue; the policy is ``training`` (``job_id`` names the job: follow it at
    ``GET /jobs/{job_id}``, cancel it there) and ``ready`` once the job succeeded."""
    if body.train is None:
        policy = service.register_policy(session, settings, who, body)
    else:
        policy, job = service.create_training(session, settings, locks, who, body)
        JOBS_SUBMITTED.inc()
        dispatcher.submit(job.id)  # after the commit; the relay covers a failed publish
        response.headers["Location"] = f"/policies/{policy.id}"
    return PolicyOut.model_validate(policy)


@router.get("", response_model=list[PolicyOut])
def list_policies(
    session: ReadSessionDep,
    who: CurrentTenant,
    model: str | None = None,
    status_: Annotated[
        Literal["training", "ready", "failed", "cancelled"] | None, Query(alias="status")
    ] = None,
) -> list[PolicyOut]:
    """The tenant's policies, newest first (``model``, ``status``: only those)."""
    return [PolicyOut.model_validate(p) for p in service.list_policies(session, who, model, status_)]


@router.get("/{policy_id}", response_model=PolicyOut)
def get_policy(policy_id: uuid.UUID, session: ReadSessionDep, who: CurrentTenant) -> PolicyOut:
    """A policy; while it trains, its job (``job_id``) has the stages, progress and events."""
    return PolicyOut.model_validate(service.get_policy(session, who, policy_id))
