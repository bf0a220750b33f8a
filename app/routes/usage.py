"""Storage accounting: what a tenant keeps on the service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import CurrentTenant, DbRoute, ReadSessionDep
from app.retention import usage as tenant_usage
from app.schemas import Usage

router = APIRouter(tags=["usage"], route_class=DbRoute)


@router.get("/usage", response_model=Usage)
def usage(session: ReadSessionDep, who: CurrentTenant) -> dict[str, Any]:
    """The tenant's jobs, stored artifacts and their bytes (stage outputs are deleted when a job ends;
    artifacts after ``HIPP_ARTIFACT_RETENTION_S``)."""
    return tenant_usage(session, who.tenant_id)
