"""Service settings: one pydantic-settings object read from ``HIPP_*`` environment variables (or ``.env``).

The defaults are the embedded deployment (SQLite, a local artifact folder, a broker that needs no server),
so ``hipp serve`` works on a bare machine; the full stack overrides them in docker-compose.yml.
Every field is documented in docs/service.md. The API reads them once, when its app is created, and keeps
them in its runtime (app/runtime.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HIPP_", env_file=".env", extra="ignore")

    # Where the embedded deployment keeps its database, broker folder and artifacts.
    home: Path = Field(default=Path(".hipp"), description="Folder for embedded state")

    # Database. Postgres in production, SQLite for the embedded default.
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite under HIPP_HOME")

    # Broker. Empty = the filesystem transport under HIPP_HOME (no server to run).
    broker_url: str = Field(default="", description="Celery broker URL; empty = filesystem broker")
    gpu_queue: str = "gpu"
    default_queue: str = "default"

    # Plan evaluations of a job's plan search and of policy training (docs/service.md, "Scaling plan
    # evaluations"): in the job's own process, or spread over evaluation workers through a queue.
    evaluation_mode: Literal["inprocess", "queue"] = Field(
        default="inprocess", description="inprocess: the job scores its plans itself; queue: on evaluation workers"
    )
    evaluation_queue: str = "evaluation"
    evaluation_chunk: int = Field(default=2, ge=1, le=256, description="Plans per evaluation task")
    evaluation_timeout_s: float = Field(
        default=900.0, gt=0, description="Longest wait for one batch of plan evaluations on the queue"
    )
    evaluation_threads: int = Field(default=1, ge=1, le=256, description="Torch threads of an evaluation worker")
    result_backend_url: str = Field(
        default="", description="Celery result backend for plan evaluations; empty = the broker (Redis)"
    )

    # Artifact storage.
    storage: Literal["local", "s3"] = "local"
    storage_dir: Path | None = Field(default=None, description="Local store root; default HIPP_HOME/artifacts")
    s3_bucket: str = "hipp-artifacts"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_addressing_style: Literal["auto", "virtual", "path"] = "path"
    s3_create_bucket: bool = Field(default=False, description="Create the bucket at start-up if missing")
    s3_multipart_threshold_mb: int = 64
    s3_multipart_chunk_mb: int = 64
    s3_max_concurrency: int = 4

    # Signed download URLs.
    url_expiry_s: int = Field(default=3600, ge=10, le=7 * 24 * 3600)
    signing_secret: str = Field(default="", description="HMAC key for local signed URLs; empty = per-home file")
    public_url: str = Field(default="http://127.0.0.1:8000", description="Base URL the API is reached at")

    # API behaviour.
    max_body_bytes: int = 64 * 1024
    page_size_max: int = 200
    api_key_cache_s: float = Field(default=10.0, description="How long a verified API key is cached in-process")
    api_threads: int = Field(
        default=40, ge=1, le=1000, description="Threads that run route code (blocking I/O); sizes the DB pool"
    )
    db_pool_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="Longest wait for a pooled DB connection before a 503 with Retry-After"
    )
    long_poll_max_s: float = Field(default=60.0, ge=0, le=600, description="Largest ?wait= of GET /jobs/{id}")
    metrics_token: str = Field(
        default="", description="Bearer token for /metrics; set, it is required and job counts are shown"
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["testbed", "testbed-seed1", "testbed-deep", "tiny-llava", "tiny-qwen2.5-vl",
                                 "tiny-qwen2-vl"]
    )
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Server folders whose models may be used"
    )
    policy_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Server folders whose policy directories POST /policies may name"
    )
    allow_hub_models: bool = Field(default=False, description="Accept Hugging Face hub ids (org/name)")

    # Datasets (POST /datasets): upload limits and the archive-safety caps validation enforces.
    dataset_direct_upload_max_bytes: int = Field(
        default=32 * 1024 * 1024, ge=0, description="Largest archive PUT /datasets/{id}/archive accepts in its body"
    )
    dataset_upload_max_bytes: int = Field(
        default=5 * 1024**3, ge=1, description="Largest archive a signed upload URL or an s3:// reference may hold"
    )
    dataset_max_members: int = Field(default=100_000, ge=1, description="Most files and folders in an archive")
    dataset_max_unpacked_bytes: int = Field(
        default=20 * 1024**3, ge=1, description="Largest total uncompressed size of an archive's files"
    )
    dataset_max_ratio: float = Field(
        default=100.0, gt=1, description="Largest uncompressed/compressed size ratio (decompression bombs)"
    )
    dataset_max_image_pixels: int = Field(
        default=50_000_000, ge=1, description="Largest image (width x height) a data set may hold"
    )

    # Jobs.
    max_attempts: int = 3
    lease_s: int = 120
    heartbeat_s: float = 5.0
    enqueue_retry_s: int = 30
    requeue_after_s: int = Field(
        default=600, description="Re-publish a job still queued this long after its enqueue (lost broker message)"
    )
    reap_interval_s: float = Field(default=30.0, gt=0, description="Period of the reaper (beat)")
    cancel_poll_s: float = Field(default=1.0, gt=0, description="How often a running job reads its status")
    max_active_jobs_per_tenant: int = Field(
        default=20, ge=0, description="Queued + running + cancelling jobs per tenant; 0 = no limit"
    )
    max_waiting_per_tenant: int = Field(
        default=1, ge=0, description="Published, not yet running jobs per tenant in the broker (fair order); 0 = all"
    )
    rate_limit_per_minute: float = Field(
        default=120.0, ge=0, description="POST /jobs and cancels per tenant per minute (API process); 0 = no limit"
    )
    rate_limit_burst: int = Field(default=60, ge=1, description="Requests a tenant may make at once before the rate")
    artifact_retention_s: int = Field(
        default=30 * 24 * 3600, ge=0, description="Artifacts are deleted this long after their job ended; 0 = kept"
    )
    retention_interval_s: float = Field(default=600.0, gt=0, description="Period of the retention sweep (beat)")
    fault_injection: bool = Field(
        default=False, description="Test only: honour metadata.fault = {crash_at: STAGE} (SIGKILL the worker)"
    )
    work_dir: Path | None = Field(default=None, description="Worker scratch folder; default HIPP_HOME/work")
    device: str = Field(default="auto", description="Worker device: auto (cuda when available), cuda, cuda:N, cpu")
    dtype: str = Field(
        default="auto",
        description="dtype the worker loads and prunes in: auto (the checkpoint's own; float16 is computed in "
        "float32 on a CPU), float32, bfloat16, float16. A job's export.dtype sets the exported weights' dtype",
    )

    @model_validator(mode="after")
    def _queue_needs_results(self) -> Settings:
        if self.evaluation_mode == "queue" and self.resolved_result_backend is None:
            raise ValueError("HIPP_EVALUATION_MODE=queue needs a Redis broker (HIPP_BROKER_URL) or "
                             "HIPP_RESULT_BACKEND_URL: the filesystem broker keeps no results; use "
                             "HIPP_EVALUATION_MODE=inprocess")
        return self

    @field_validator("allowed_models", "model_dirs", "policy_dirs", mode="before")
    @classmethod
    def _split_csv(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip().startswith("["):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    # Derived values -------------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'hipp.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem")

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_result_backend(self) -> str | None:
        """Where evaluation workers put their answers: HIPP_RESULT_BACKEND_URL, else a Redis broker itself;
        None with the filesystem broker (it has no result store: plan evaluations then run in process)."""
        if self.result_backend_url:
            return self.result_backend_url
        return None if self.embedded_broker else self.broker_url

    @property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.home / "artifacts").resolve()

    @property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "work").resolve()

    @property
    def resolved_signing_secret(self) -> bytes:
        if self.signing_secret:
            return self.signing_secret.encode()
        path = self.home / "signing.key"
        if not path.exists():
            import os
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL: when two processes start together, exactly one writes the key
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
            except FileExistsError:
                pass
        import time

        for _ in range(50):
            key = path.read_text().strip()
            if key:
                return key.encode()
            time.sleep(0.02)
        raise RuntimeError(f"signing key file {path} is empty; delete it or set HIPP_SIGNING_SECRET")


def get_settings() -> Settings:
    """Settings read from the environment now (not cached: a process that needs them for its lifetime keeps
    the object, as the API's runtime does)."""
    return Settings()
