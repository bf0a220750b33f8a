"""The one learning-rate schedule: linear warmup, then cosine down to the caller's floor."""

from __future__ import annotations

import pytest

from worker.hipp.recovery.schedule import warmup_cosine
from worker.hipp.testbed.train import LR_FLOOR, lr_factor


def test_warmup_is_linear_then_the_cosine_ends_at_the_floor() -> None:
    assert [warmup_cosine(s, 0.0, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(10, 0.0, 4, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 0.5, 4, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(10, 1.0, 4, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10, 3.0, 4, 0.1) == pytest.approx(0.1)  # a run past its budget stays at the floor


def test_the_testbed_recipe_uses_it_with_its_own_floor() -> None:
    assert lr_factor(500, 1.0, 100) == pytest.approx(LR_FLOOR) and LR_FLOOR == 0.05
