"""The evaluation worker's Celery app: ``celery -A worker.evaluation_worker worker -Q evaluation``.

The same app and tasks as ``worker.celery_app``, with the settings plan evaluations need: a pool child lives
for many tasks (the GPU workers' fresh child per job would reload the model and evaluation set for every
chunk; here ``worker.evaluation_queue`` keeps them per process), and torch uses ``HIPP_EVALUATION_THREADS``
threads (one by default: several evaluation workers share a machine's cores, and a fixed count keeps the
answers equal to the caller's own, bit for bit). Start one per GPU, or several per machine on CPUs.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

from worker.celery_app import celery_app, settings

celery_app.conf.update(worker_max_tasks_per_child=None)
app = celery_app


@worker_process_init.connect
def _torch_threads(**_: Any) -> None:
    import torch

    torch.set_num_threads(settings.evaluation_threads)

