"""Pruning: the plan (``plan``: JSON, validation, parameter and FLOP accounting), importance criteria
(``criteria``: which units), per-layer counts (``layer_counts``: feasibility and rounding), the allocators
that decide how much per layer (``allocators``), the per-device MLP-width multiple and what rounding to it
costs (``rounding``), the ``planner`` that scores, allocates and selects, and the two ways to apply a plan:
``masking`` (reversible, for scoring) and ``surgery`` (physical slicing).

Criteria and allocators are objects configured in their constructors, registered by name in
``criteria.CRITERIA`` and ``allocators.ALLOCATORS`` (:class:`worker.hipp.registry.Registry`); a new one is one
class in that module.

Imports ``models``, ``data`` and the registry.
"""
