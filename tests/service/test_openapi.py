"""The OpenAPI document tells the truth (issue 18, finding 8): walked here operation by operation, and the
error bodies the API really sends validated against the schema it documents. (Schemathesis checks every
answer of >= 2,000 generated requests against it in tests/faults/test_api_faults.py.)"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.service.conftest import auth

GOOD = {"model": "tiny-llava", "preference": {"utility": 1.0}}
ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture
def spec(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return client.get("/openapi.json").json()  # type: ignore[no-any-return]


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def test_no_fastapi_validation_error_shape_anywhere(spec: dict[str, Any]) -> None:
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text and "ValidationError" not in text


def test_every_error_response_uses_the_error_schema(spec: dict[str, Any]) -> None:
    seen = 0
    for method, path, op in operations(spec):
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            seen += 1
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, (method, path, status)
            if status in ("429", "503"):
                assert "Retry-After" in response.get("headers", {}), (method, path, status)
    assert seen > 40


def test_each_operation_lists_the_errors_it_can_answer(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        codes = set(op["responses"])
        if op.get("security"):
            assert "401" in codes, (method, path)
        if "{" in path:
            assert "404" in codes, (method, path)
        if op.get("parameters") or op.get("requestBody"):
            assert "422" in codes, (method, path)
        if op.get("requestBody"):
            assert {"400", "413", "415", "422"} <= codes, (method, path)
        if path not in ("/healthz", "/files/{key}"):
            assert "503" in codes, (method, path)
    post = spec["paths"]["/jobs"]["post"]["responses"]
    assert {"200", "201", "409", "429"} <= set(post)
    assert post["200"]["content"] == post["201"]["content"]  # the idempotent replay returns the job
    ids = {op["operationId"] for _, _, op in operations(spec)}
    links = post["201"]["links"]
    assert {"GetJob", "CancelJob", "ListEvents", "DeleteJob"} <= set(links)
    assert all(link["operationId"] in ids for link in links.values())
    assert {"409", "429"} <= set(spec["paths"]["/jobs/{job_id}/cancel"]["post"]["responses"])
    assert "409" in spec["paths"]["/jobs/{job_id}"]["delete"]["responses"]
    assert {"get", "head"} <= set(spec["paths"]["/files/{key}"])
    assert {"400", "403", "404"} <= set(spec["paths"]["/files/{key}"]["get"]["responses"])
    assert "/usage" in spec["paths"]


def test_real_error_bodies_match_the_documented_schema(client, tenant_key: str, spec: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    schema = {"$ref": ERROR_REF, "components": spec["components"]}
    job_id = client.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    answers = [
        (client.get("/jobs"), 401),
        (client.get("/jobs/00000000-0000-0000-0000-000000000000", headers=auth(tenant_key)), 404),
        (client.get("/jobs/nope", headers=auth(tenant_key)), 422),
        (client.post("/jobs", json={"model": "x"}, headers=auth(tenant_key)), 422),
        (client.post("/jobs", content=b"{", headers={**auth(tenant_key), "Content-Type": "application/json"}), 422),
        (client.post("/jobs", content=b"{}", headers={**auth(tenant_key), "Content-Type": "text/plain"}), 415),
        (client.post("/jobs", json={**GOOD, "metadata": {"x": "y" * 70_000}}, headers=auth(tenant_key)), 413),
        (client.get("/jobs", params={"cursor": "!!"}, headers=auth(tenant_key)), 400),
        (client.delete(f"/jobs/{job_id}", headers=auth(tenant_key)), 409),
    ]
    for response, status in answers:
        assert response.status_code == status, response.text
        jsonschema.validate(response.json(), schema)
        method = response.request.method.lower()
        path = "/jobs/{job_id}" if response.request.url.path.count("/") == 2 else response.request.url.path
        assert str(status) in spec["paths"][path][method]["responses"], (method, path, status)
