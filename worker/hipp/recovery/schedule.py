"""The learning-rate schedule every training loop of the engine uses (recovery and the testbed recipe):
linear warmup, then a cosine over the run's progress down to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, progress: float, warmup: int, floor: float) -> float:
    """LR factor at ``step``: ``(step + 1) / warmup`` during warmup, then cosine in ``progress`` (0..1, clipped)
    from 1 down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
