"""The HiPP-Prune pruning engine, importable and runnable without Celery or a database.

One concept per room, each importing only the rooms listed before it (no circles; ``docs/architecture.md``):

- ``errors``, ``progress``: what every room may raise and how long work reports stages, progress and cancel.
- ``models``: where the units of each model family are (``adapters``, one file per family), loading a model
  reference, the built-in models, checkpoint export, export options, the fast decode path.
- ``data``: the synthetic world, calibration images and activation statistics, training conversations.
- ``pruning``: plans (JSON, validation, accounting), importance criteria (which units), per-layer counts and the
  allocators (how many per layer), the planner that joins them, masks and surgery (two ways to apply a plan).
- ``evaluation``: benchmark tasks (POPE, ScienceQA) that own their prompt, parsing and metric, the runner that
  evaluates a model on task files, and the plan evaluator that scores plans with masks.
- ``sensitivity``: attention-flow visual sensitivity per decoder layer.
- ``policy``: the preference-conditioned policy (state features, network, GRPO, plan search, stability proxy,
  policy store and the shipped policies).
- ``recovery``: LoRA / distillation fine-tuning of a pruned model.
- ``testbed``: the trained testbed VLM and its world's benchmark files (uses everything above).
- ``calibration_source``: which data a model is calibrated on (the testbed's world or synthetic shapes).
- ``plots``: every plot the engine draws.
"""
