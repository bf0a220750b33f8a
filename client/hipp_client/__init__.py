"""hipp_client: a light Python client for the HiPP-Prune service. It needs httpx only (no torch, no engine).

    from hipp_client import HippClient

    with HippClient() as hipp:                      # $HIPP_API_URL, $HIPP_API_KEY
        job = hipp.submit_job("testbed", {"utility": 0.5, "robustness": 0.3, "compression": 0.2})
        job = hipp.wait(job.id, timeout=3600)
        path = hipp.download(job.id, "out/")        # SHA-256 checked; out/checkpoint/

``HippClient`` (client.py) speaks the API: jobs (submit, get, list, cancel, delete, events, artifacts, plans,
wait, download). Answers come back as the dataclasses of types.py; every failure is a ``HippApiError``
(errors.py). Datasets (datasets.py): create, upload (signed URL, multipart, direct), wait for validation, list,
get, delete. Policies (policies.py): register, train as a job, wait for a training, list, get.
"""

from hipp_client.client import DEFAULT_URL, HippClient, fetch_verified
from hipp_client.errors import (
    BAD_RESPONSE,
    CHECKSUM_MISMATCH,
    DOWNLOAD_FAILED,
    NO_SUCH_ARTIFACT,
    UNREACHABLE,
    UPLOAD_FAILED,
    WAIT_TIMEOUT,
    HippApiError,
)
from hipp_client.types import TERMINAL, Artifact, Dataset, Event, Job, JobError, Page, Plan, Policy

__version__ = "0.1.0"

__all__ = [
    "BAD_RESPONSE",
    "CHECKSUM_MISMATCH",
    "DEFAULT_URL",
    "DOWNLOAD_FAILED",
    "NO_SUCH_ARTIFACT",
    "TERMINAL",
    "UNREACHABLE",
    "UPLOAD_FAILED",
    "WAIT_TIMEOUT",
    "Artifact",
    "Dataset",
    "Event",
    "HippApiError",
    "HippClient",
    "Job",
    "JobError",
    "Page",
    "Plan",
    "Policy",
    "fetch_verified",
]
