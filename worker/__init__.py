"""Worker side of HiPP-Prune: the Celery app, the job pipeline, and the pruning engine (``worker.hipp``)."""
