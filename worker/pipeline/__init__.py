"""The job pipeline: load -> sensitivity -> plan -> prune -> recover -> evaluate -> upload, for one job row.

Thin on purpose: the engine (``worker.hipp``, mostly its ``job`` entry points) makes every decision; the
pipeline runs it against the database and object storage. Its modules, each with one concern:

- ``run``: one claimed attempt (claim, lease, heartbeat, events, progress, cancel, stage completion);
- ``context``: what the stages share (the job, its options with the API's defaults, the loaded model, the
  plan, the result so far);
- ``stages``: each stage a few lines around one engine entry point;
- ``outputs``: stage outputs in object storage, for a retry to resume from, and the checkpoint's artifacts;
- ``runner``: the attempt from claim to outcome (succeeded, failed, re-queued, cancelled);
- ``faults``: fault injection for the fault tests (off unless ``HIPP_FAULT_INJECTION``).

Importing it does not import torch (``runner`` imports the stages, and with them the engine, when the first
stage runs), so the Celery worker's main process and the light worker stay torch-free.
"""

from worker.pipeline.runner import run_job

__all__ = ["run_job"]
