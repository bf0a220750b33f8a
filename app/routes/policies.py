"""Policies: trained HiPP-Prune policies a job uses for its model instead of the baseline allocator."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlalchemy import select

from app.deps import CurrentTenant, DbRoute, ReadSessionDep, SessionDep, SettingsDep
from app.errors import not_found
from app.modelrefs import check_policy_uri
from app.models import Policy
from app.schemas import PolicyCreate, PolicyOut

router = APIRouter(prefix="/policies", tags=["policies"], route_class=DbRoute)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=PolicyOut)
def create_policy(body: PolicyCreate, session: SessionDep, settings: SettingsDep, who: CurrentTenant) -> PolicyOut:
    """Register a policy. ``uri``: a stored policy's id or model fingerprint, or a folder under
    ``HIPP_POLICY_DIRS`` / ``HIPP_MODEL_DIRS`` (anything else is 422 ``invalid_policy_uri``)."""
    uri = check_policy_uri(body.uri, settings) if body.uri is not None else None
    policy = Policy(
        tenant_id=who.tenant_id,
        name=body.name,
        model=body.model,
        fingerprint=body.fingerprint,
        uri=uri,
        metrics=body.metrics,
        meta=body.metadata,
    )
    session.add(policy)
    session.commit()
    return PolicyOut.model_validate(policy)


@router.get("", response_model=list[PolicyOut])
def list_policies(session: ReadSessionDep, who: CurrentTenant, model: str | None = None) -> list[PolicyOut]:
    q = select(Policy).where(Policy.tenant_id == who.tenant_id)
    if model is not None:
        q = q.where(Policy.model == model)
    return [PolicyOut.model_validate(p) for p in session.scalars(q.order_by(Policy.created_at.desc()))]


@router.get("/{policy_id}", response_model=PolicyOut)
def get_policy(policy_id: uuid.UUID, session: ReadSessionDep, who: CurrentTenant) -> PolicyOut:
    policy = session.scalar(select(Policy).where(Policy.id == policy_id, Policy.tenant_id == who.tenant_id))
    if policy is None:
        raise not_found("policy", policy_id)
    return PolicyOut.model_validate(policy)
