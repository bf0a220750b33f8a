"""The OpenAPI document, told truthfully: every error an operation can answer is listed with the one error
shape the API sends (``{"error": {"code", "message", "detail"}}``, app/errors.py), FastAPI's
``HTTPValidationError`` (``{"detail": [...]}``, never sent) is gone, ``POST /jobs`` documents its 200
idempotent replay, and ``Retry-After`` is declared where the API sets it.

Which errors an operation can answer follows from what it has (a key check, path ids, a body, a database
query) plus a short table of what individual routes add; tests/service/test_openapi.py walks the document
and schemathesis checks every answer against it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

ERROR_REF = "#/components/schemas/ErrorResponse"


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code (see docs/service.md)")
    message: str = Field(description="What went wrong and how to fix it")
    detail: Any = Field(default=None, description="Structured context: the invalid fields, limits, ...")


class ErrorResponse(BaseModel):
    error: ErrorBody


DESCRIPTIONS = {
    400: "Malformed request: `invalid_body` (not parseable JSON), `invalid_cursor`, `invalid_idempotency_key`,"
    " `invalid_key`",
    401: "`missing_api_key` or `invalid_api_key` (no key, a wrong or a revoked one)",
    403: "`bad_signature` or `url_expired` (signed download or upload URL)",
    404: "`not_found`: no such resource, or it belongs to another tenant",
    409: "Conflict: `job_finished` (cancel), `job_active` (delete), `idempotency_key_reused`,"
    " `plan_job_not_succeeded` (a `plan` from a job that has not succeeded), `dataset_not_uploading`,"
    " `archive_missing` (complete before the archive was uploaded), `dataset_in_use` (delete)",
    413: "`body_too_large`: the body is larger than `HIPP_MAX_BODY_BYTES` (also when sent chunked; for an"
    " archive upload, its own limit)",
    415: "`unsupported_media_type`: the body is not sent as `Content-Type: application/json`",
    422: "`invalid_request` (names the field and what to fix), `unknown_model`, `invalid_policy_uri`,"
    " `invalid_plan_reference` (a `plan` whose job, index or model does not fit), `invalid_data_reference`,"
    " `search_needs_data` (a policy `train` for a model other than the testbed without `train.search`),"
    " `invalid_s3_uri`,"
    " `empty_archive`, `invalid_upload_parts` (a multipart upload that cannot be completed)",
    429: "`quota_exceeded` (active jobs per tenant) or `rate_limited` (requests per tenant); see `Retry-After`",
    503: "`database_unavailable` / `server_busy` (retry after `Retry-After`), `not_ready` (readiness),"
    " `queue_unavailable` (a data set's validation could not be queued)",
}
RETRY_AFTER = {429, 503}

# What single routes add to the errors their shape implies ((method, path) -> codes).
EXTRA: dict[tuple[str, str], set[int]] = {
    ("post", "/jobs"): {400, 409, 429},
    ("post", "/policies"): {409, 429},
    ("get", "/jobs"): {400},
    ("delete", "/jobs/{job_id}"): {409},
    ("post", "/jobs/{job_id}/cancel"): {409, 429},
    ("get", "/jobs/{job_id}/events"): {400},
    ("get", "/files/{key}"): {400, 403, 404},
    ("head", "/files/{key}"): {400, 403, 404},
    ("put", "/files/{key}"): {400, 403, 404},
    ("get", "/datasets"): {400},
    ("post", "/datasets"): {503},
    ("post", "/datasets/{dataset_id}/complete"): {409},
    ("put", "/datasets/{dataset_id}/archive"): {409},
    ("delete", "/datasets/{dataset_id}"): {409},
}
NO_DATABASE = {"/healthz", "/files/{key}"}


def error_codes(path: str, method: str, op: dict[str, Any]) -> set[int]:
    codes = set(EXTRA.get((method, path), set()))
    if op.get("security"):
        codes.add(401)
    if "{" in path:
        codes.add(404)
    if op.get("parameters") or op.get("requestBody"):
        codes.add(422)
    if op.get("requestBody"):
        codes |= {400, 413, 415}
    if path not in NO_DATABASE:
        codes.add(503)
    return codes


def error_response(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": DESCRIPTIONS[code],
        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
    }
    if code in RETRY_AFTER:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    return response


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, sub in ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").get(
        "$defs", {}
    ).items():
        components[name] = sub
    top = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    top.pop("$defs", None)
    components["ErrorResponse"] = top
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            for code in sorted(error_codes(path, method, op)):
                responses[str(code)] = error_response(code)
    jobs_post = schema["paths"]["/jobs"]["post"]["responses"]
    jobs_post["200"] = {
        "description": "Idempotent replay: this `Idempotency-Key` was used before with the same body; the job"
        " it created",
        "content": jobs_post["201"]["content"],
    }
    # Links: what a client (and schemathesis' stateful runs) can do next with the job it just created.
    links = {}
    for (method, path), name in JOB_LINKS.items():
        op = schema["paths"].get(path, {}).get(method)
        if op is not None:
            links[name] = {"operationId": op["operationId"], "parameters": {"job_id": "$response.body#/id"}}
    jobs_post["201"]["links"] = jobs_post["200"]["links"] = links
    return schema


JOB_LINKS = {
    ("get", "/jobs/{job_id}"): "GetJob",
    ("post", "/jobs/{job_id}/cancel"): "CancelJob",
    ("get", "/jobs/{job_id}/events"): "ListEvents",
    ("get", "/jobs/{job_id}/artifacts"): "ListArtifacts",
    ("get", "/jobs/{job_id}/plans"): "ListPlans",
    ("delete", "/jobs/{job_id}"): "DeleteJob",
}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
