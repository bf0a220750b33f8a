"""The HiPP-Prune pruning engine.

Importable and runnable without Celery or a database. One concept per module:
``adapters`` (where the prunable units of a model family are), ``importance`` (which units),
``allocation`` (how many per layer), ``plan`` (the JSON plan, validation, accounting), ``masking`` and
``surgery`` (two ways to apply a plan), ``calibration`` (activation statistics), ``loading`` and
``checkpoint`` (model I/O), ``progress`` (stage/progress/cancel reporting).
"""
