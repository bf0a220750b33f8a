"""The light client's types mirror the API's answer schemas: a field added to (or renamed in) ``app/schemas.py``
without the client following fails here, not in a user's script."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pytest

from app import schemas
from hipp_client import types

#: Answer fields the client leaves in ``raw`` on purpose, with the reason.
IN_RAW_ONLY = {
    "Dataset": {"upload"},  # the upload target: in POST /datasets' answer only, read by upload_dataset
}
PAIRS = [(types.Job, schemas.JobOut), (types.JobError, schemas.JobError), (types.Event, schemas.EventOut),
         (types.Artifact, schemas.ArtifactOut), (types.Plan, schemas.PlanOut), (types.Policy, schemas.PolicyOut),
         (types.Dataset, schemas.DatasetOut), (types.Page, schemas.Page)]


@pytest.mark.parametrize(("client_type", "schema"), PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_client_type_has_the_schemas_fields(client_type, schema):
    client_fields = {f.name for f in dataclasses.fields(client_type)} - {"raw"}
    expected = set(schema.model_fields) - IN_RAW_ONLY.get(client_type.__name__, set())
    assert client_fields == expected, (
        f"{client_type.__name__}: missing {sorted(expected - client_fields)}, "
        f"not in {schema.__name__} {sorted(client_fields - expected)}")


def test_a_dataset_answer_reads_into_the_client_type():
    now = datetime.now(UTC)
    answer = schemas.DatasetOut(id=uuid.uuid4(), kind="pope", name="mine", state="ready", source="s3",
                                sha256="ab" * 32, size=10, counts={"images": 2}, reasons=[], created_at=now,
                                updated_at=now).model_dump(mode="json")
    dataset = types.Dataset.from_json(answer)
    assert (dataset.source, dataset.updated_at, dataset.size) == ("s3", now, 10)
    assert dataset.raw == answer
