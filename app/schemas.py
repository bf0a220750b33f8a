"""What the API speaks (pydantic). Tables live apart in app/models.py.

Every request model forbids unknown fields, so a typo is a 422 that names the field instead of a silent
default; types are strict (no string or boolean coercion where a number is meant); NUL characters, lone
surrogates, NaN and nesting deeper than ``MAX_DEPTH`` are a 422 rather than a database or encoding error.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.hipp.preference import KEYS, check_keys
from worker.hipp.preference import Preference as EnginePreference

PREFERENCE_KEYS = KEYS

T = TypeVar("T")


MAX_DEPTH = 32  # nesting of JSON objects/arrays inside a request body (metadata, metrics)


def _surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_value(value: Any, path: str, depth: int = 0) -> None:
    """Reject what the database or the JSON encoder cannot take, before anything is stored: NUL characters
    (Postgres text), lone UTF-16 surrogates such as ``"\\ud800"`` (not encodable as UTF-8), NaN and
    infinities (not JSON), and nesting deeper than ``MAX_DEPTH``. Iterative, so no depth can overflow it."""
    stack: list[tuple[Any, str, int]] = [(value, path, depth)]
    while stack:
        item, where, level = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError(f"{_printable(where)}: text must not contain NUL (\\u0000) characters")
            if _surrogate(item):
                raise ValueError(
                    f"{_printable(where)}: text contains a lone UTF-16 surrogate (e.g. \\ud800) that is not valid "
                    "Unicode; send well-formed UTF-8"
                )
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise ValueError(f"{_printable(where)}: NaN and Infinity are not JSON numbers; send a finite number")
        elif isinstance(item, dict | list):
            if level >= MAX_DEPTH:
                raise ValueError(
                    f"{_printable(where)}: nested deeper than {MAX_DEPTH} levels; flatten it (metadata is meant "
                    "for a few labels)"
                )
            if isinstance(item, dict):
                for k, v in item.items():
                    stack.append((k, where, level + 1))
                    stack.append((v, f"{where}.{k}" if isinstance(k, str) and not _surrogate(k) else where, level + 1))
            else:
                for i, v in enumerate(item):
                    stack.append((v, f"{where}[{i}]", level + 1))


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:200]


class Strict(BaseModel):
    """Unknown fields are rejected; no type coercion (a number must be a JSON number, a flag a JSON boolean:
    ``"0.5"`` and ``true`` are not numbers); and nothing the database or JSON cannot hold is accepted
    anywhere in the body: NUL characters, lone surrogates, NaN/Infinity, nesting deeper than ``MAX_DEPTH``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for k, v in data.items():
                check_json_value(k, "body")
                check_json_value(v, str(k) if isinstance(k, str) and not _surrogate(k) else "body")
        return data


class Preference(Strict):
    """Trade-off weights. Non-negative, finite, not all zero; normalized to sum to 1. Missing keys are 0."""

    utility: float = 0.0
    robustness: float = 0.0
    compression: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_keys(data)
        return data

    @model_validator(mode="after")
    def _normalize(self) -> Preference:
        normalized = EnginePreference.from_values([self.utility, self.robustness, self.compression])
        for key, value in normalized.as_dict().items():
            object.__setattr__(self, key, value)
        return self


class RecoveryOptions(Strict):
    steps: int = Field(default=0, ge=0, le=100_000, description="Recovery (fine-tuning) steps; 0 = none")
    method: Literal["lora", "kd", "lora+kd"] = Field(
        default="lora", description="lora: cross-entropy; kd / lora+kd distill from the dense model"
    )
    learning_rate: float | None = Field(default=None, gt=0, le=1.0, description="Default: the method's own")
    batch_size: int = Field(default=4, ge=1, le=256)
    max_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="Time budget")


class EvaluationOptions(Strict):
    enabled: bool = True
    max_samples: int = Field(default=16, ge=1, le=100_000, description="Questions per benchmark split")
    world: bool = Field(
        default=False,
        description="Evaluate on the synthetic world's benchmarks when data.evaluation names nothing. Only the "
        "testbed is evaluated on them by default: for any other model, a job without evaluation data evaluates "
        "nothing (and says so) unless this is true",
    )


class CalibrationOptions(Strict):
    samples: int = Field(default=16, ge=1, le=4096, description="Calibration images for importance scoring")
    sensitivity_samples: int = Field(default=8, ge=1, le=4096, description="Images for visual sensitivity")


class ExportOptions(Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of the exported weights; auto: the source checkpoint's own"
    )
    max_shard_size_mb: float = Field(
        default=5000, ge=0.05, le=100_000, description="Largest safetensors shard of the export, in MB (10^6 bytes)"
    )


class BenchmarkData(Strict):
    """A POPE and/or a ScienceQA data set (``ready``, of this tenant), by id."""

    pope: uuid.UUID | None = Field(default=None, strict=False, description="A data set of kind pope")
    scienceqa: uuid.UUID | None = Field(default=None, strict=False, description="A data set of kind scienceqa")


class JobData(Strict):
    """The tenant's data sets a job runs on, by id (GET /datasets); each must be ``ready`` and of its kind."""

    calibration: uuid.UUID | None = Field(
        default=None, strict=False, description="A data set of kind images: the calibration images"
    )
    evaluation: BenchmarkData | None = Field(
        default=None, description="The benchmarks the dense and the pruned model are measured on"
    )
    recovery: uuid.UUID | None = Field(
        default=None, strict=False, description="A data set of kind conversations: what recovery trains on"
    )
    search: BenchmarkData | None = Field(
        default=None, description="The benchmarks a trained policy's plans are scored on during the plan search"
    )


class PlanReference(Strict):
    """One plan of an earlier job's front, replayed as it is (no sensitivity, no plan search)."""

    job: uuid.UUID = Field(strict=False, description="A succeeded job of this tenant, on the same model reference")
    index: int = Field(ge=0, le=10_000, description="Position in that job's GET /jobs/{id}/plans list (0-based)")


class JobCreate(Strict):
    model: str = Field(
        min_length=1,
        max_length=500,
        description="Built-in name (tiny-llava, testbed), allowed path or hub id",
    )
    preference: Preference | None = Field(
        default=None,
        description="Trade-off that chooses the plan; required unless `plan` is given (then it is only "
        "recorded, and defaults to the preference of the job the plan comes from)",
    )
    target_sparsity: float | None = Field(
        default=None, ge=0.0, lt=0.95,
        description="Matched mode: prune to this fraction of prunable params (0: export unpruned, a format check);"
        " not with `plan` (the plan fixes the sparsity)",
    )
    plan: PlanReference | None = Field(
        default=None,
        description="Materialize plan `index` of an earlier job's front instead of searching: the sensitivity and "
        "plan stages are skipped and `preference` / `target_sparsity` choose nothing. The earlier job must be "
        "this tenant's, succeeded, on the same `model`",
    )
    recovery: RecoveryOptions = Field(default_factory=RecoveryOptions)
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    export: ExportOptions = Field(default_factory=ExportOptions)
    data: JobData | None = Field(
        default=None,
        description="The tenant's data sets to calibrate, evaluate, recover and search on (by id); what is not "
        "named falls back to the engine's synthetic data (the testbed's world), as the result records",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("model must not be blank")
        return v

    @model_validator(mode="after")
    def _plan_or_preference(self) -> JobCreate:
        if self.plan is None and self.preference is None:
            raise ValueError("preference: required (e.g. {\"utility\": 1}) unless plan {job, index} is given")
        if self.plan is not None and self.target_sparsity is not None:
            raise ValueError("target_sparsity: not used with plan (the replayed plan fixes the sparsity); drop one")
        return self


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool = False


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: Literal["prune", "train_policy"] = Field(
        description="prune: POST /jobs; train_policy: a policy's training (POST /policies with train)"
    )
    status: Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
    stage: str | None
    stage_progress: float
    progress: float
    model: str
    preference: dict[str, float]
    target_sparsity: float | None
    options: dict[str, Any]
    metadata: dict[str, Any] = Field(validation_alias="meta")
    attempt: int
    max_attempts: int
    heartbeat_at: datetime | None
    error: JobError | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on the last page")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    level: str
    stage: str | None
    message: str
    data: dict[str, Any]


class ArtifactOut(BaseModel):
    id: uuid.UUID
    kind: str = Field(description="checkpoint (checkpoint.tar), hipp_plan, metrics, plans (hipp_plans.json: every "
                      "plan considered, in full), front (front.png), allocation (allocation.png)")
    name: str
    size: int
    sha256: str
    content_type: str
    url: str = Field(description="Signed download URL, minted for this response")
    expires_at: datetime


class PlanOut(BaseModel):
    chosen: bool
    source: str
    plan: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)


class PolicyTrainOptions(Strict):
    """Plan-level GRPO for the policy's model, run as a job on the GPU queue (stages load, search_setup, train,
    register). The search set: the tenant's POPE / ScienceQA data sets (``search``), or, for the testbed
    family only, the built-in synthetic search split."""

    steps: int = Field(default=40, ge=1, le=1000, description="GRPO steps")
    group_size: int = Field(default=6, ge=2, le=64, description="Plans sampled per preference (one GRPO group)")
    preferences_per_step: int = Field(default=4, ge=1, le=64, description="Preferences (groups) per GRPO step")
    budget_min: float = Field(default=0.1, gt=0.0, lt=0.95, description="Smallest sparsity the policy proposes")
    budget_max: float = Field(default=0.6, gt=0.0, lt=0.95, description="Largest sparsity the policy proposes")
    time_budget_s: float | None = Field(
        default=None, gt=0, le=7 * 24 * 3600,
        description="Stop at the first step boundary after this many seconds of GRPO steps and register the "
        "policy trained so far (the result says how many steps ran)",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Same seed, same options: the same policy")
    search: BenchmarkData | None = Field(
        default=None,
        description="The benchmarks plans are scored on while training (required unless the model is of the "
        "testbed family, which has a built-in search split)",
    )
    search_limit: int = Field(default=32, ge=1, le=100_000, description="Questions per search benchmark split")
    calibration_samples: int = Field(default=16, ge=1, le=4096, description="Calibration images")

    @model_validator(mode="after")
    def _budget_range(self) -> PolicyTrainOptions:
        if self.budget_min >= self.budget_max:
            raise ValueError(
                f"budget_min ({self.budget_min}) must be below budget_max ({self.budget_max}): they bound the "
                "sparsity the policy proposes"
            )
        return self


class PolicyCreate(Strict):
    """Register a trained policy (``uri``), or train one (``train``): not both."""

    name: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1, max_length=500, description="Model reference the policy was trained for")
    fingerprint: str | None = Field(default=None, max_length=128)
    uri: str | None = Field(default=None, max_length=1000, description="Where the policy weights are stored")
    train: PolicyTrainOptions | None = Field(
        default=None,
        description="Train the policy as a job (GET /jobs/{job_id}: stages, progress, events; POST "
        "/jobs/{job_id}/cancel). The policy is `training` until the job ends, then `ready` (later jobs for "
        "the model use it), `failed` or `cancelled`",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _register_or_train(self) -> PolicyCreate:
        if self.train is not None:
            given = [name for name in ("uri", "fingerprint") if getattr(self, name) is not None]
            given += ["metrics"] if self.metrics else []
            if given:
                raise ValueError(f"{', '.join(given)}: set by training; drop them, or drop train to register a policy")
        return self


class PolicyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    model: str
    fingerprint: str | None
    uri: str | None
    status: Literal["training", "ready", "failed", "cancelled"] = Field(
        description="ready: jobs for the model use it; training: its job (job_id) is running or queued"
    )
    job_id: uuid.UUID | None = Field(description="The job that trains (trained) it; null for a registered policy")
    train: dict[str, Any] | None = Field(description="The training options, for a trained policy")
    metrics: dict[str, Any]
    metadata: dict[str, Any] = Field(validation_alias="meta")
    created_at: datetime


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class Usage(BaseModel):
    jobs: int = Field(description="Jobs of this tenant the service still holds (finished ones included)")
    artifacts: int = Field(description="Stored artifacts (checkpoint archives, plans, metrics)")
    artifact_bytes: int = Field(description="Their total size in bytes")


DatasetKind = Literal["images", "pope", "scienceqa", "conversations"]


class DatasetSource(Strict):
    """Where the archive comes from: ``{"upload": true}`` (a signed PUT URL, or ``PUT /datasets/{id}/archive``
    for small archives) or ``{"s3_uri": "s3://<the deployment's bucket>/..."}``."""

    upload: bool | None = Field(default=None, description="true: upload the archive after creating the data set")
    s3_uri: str | None = Field(
        default=None, max_length=1000, description="An archive (tar, tar.gz, zip) in the deployment's bucket"
    )
    hub: str | None = Field(default=None, max_length=200, description="Not accepted yet (a Hugging Face data set id)")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSource:
        if self.hub is not None:
            raise ValueError("source.hub: hub data set ids are not accepted yet; download the data set and upload it "
                             'as an archive (source {"upload": true})')
        if (self.upload is True) == (self.s3_uri is not None):
            raise ValueError('source: give exactly one of {"upload": true} or {"s3_uri": "s3://bucket/key"}')
        return self


class DatasetCreate(Strict):
    kind: DatasetKind = Field(
        description="images (calibration images), pope (POPE question files + images), scienceqa (problems.json, "
        "pid_splits.json, images/), conversations (LLaVA-format JSON + images)"
    )
    name: str = Field(min_length=1, max_length=200)
    source: DatasetSource = Field(default_factory=lambda: DatasetSource(upload=True))
    size: int | None = Field(
        default=None, ge=1, le=5 * 1024**4,
        description="The archive's size in bytes, for an upload: above the store's multipart threshold (S3) the "
        "answer's `upload` has one presigned URL per part instead of one URL",
    )


class UploadPart(BaseModel):
    number: int = Field(description="Part number, from 1: bytes [(number-1)*part_size, number*part_size)")
    url: str = Field(description="PUT this part's bytes here; keep the answer's ETag header for completing")


class UploadTarget(BaseModel):
    url: str | None = Field(description="PUT the whole archive here (signed, expires); null for a multipart upload")
    method: Literal["PUT"] = "PUT"
    expires_at: datetime
    max_bytes: int = Field(description="Largest archive this upload may hold")
    upload_id: str | None = Field(default=None, description="Multipart upload: its id, sent back when completing")
    part_size: int | None = Field(default=None, description="Multipart upload: bytes per part (the last is shorter)")
    parts: list[UploadPart] | None = Field(default=None, description="Multipart upload: one signed URL per part")


class CompletedPart(Strict):
    number: int = Field(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=200, description="The ETag header the part's PUT answered")


class DatasetComplete(Strict):
    """For a multipart upload: the upload id and every part's ETag, in order. Not needed after a single PUT."""

    upload_id: str = Field(min_length=1, max_length=1000)
    parts: list[CompletedPart] = Field(min_length=1, max_length=10_000)


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    name: str
    state: Literal["uploading", "validating", "ready", "invalid"]
    source: Literal["upload", "s3"]
    sha256: str | None = Field(description="SHA-256 of the archive, once validated")
    size: int | None = Field(description="Size of the archive in bytes, once validated")
    counts: dict[str, Any] = Field(description="What validation found: images, questions per split, problems, ...")
    reasons: list[str] = Field(description="Why the data set is invalid (each names the file and record or line)")
    created_at: datetime
    updated_at: datetime
    upload: UploadTarget | None = Field(
        default=None, description="Where to PUT the archive (state uploading, in the answer to POST /datasets)"
    )
