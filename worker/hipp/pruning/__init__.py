"""Pruning: the plan (``plan``: JSON, validation, parameter and FLOP accounting), importance criteria
(``criteria``: which units), per-layer counts (``layer_counts``: feasibility and rounding) and the allocators
that decide how much per layer (``allocators``), the ``planner`` that scores, allocates and selects, and the two
ways to apply a plan: ``masking`` (reversible, for scoring) and ``surgery`` (physical slicing).

Imports ``models`` and ``data``.
"""
