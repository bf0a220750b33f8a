"""Which images a model is calibrated on: the one owner of that choice, used by ``hipp prune``, the search and
baseline commands, the benchmarks and the service.

The testbed family is calibrated on in-distribution samples of its world (scenes with the benchmarks' prompts);
calibrating it on anything else changes which units look important and flips the baselines' ranking. Any other
model gets simple synthetic shape scenes, and the choice says so, so that results can carry the warning. Images
the caller gives (a data set of kind images) come first, for any model: each is paired with one of the default
calibration questions in turn (an images data set holds images only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from worker.hipp.data.calibration import DEFAULT_QUESTIONS, CalibrationSample, synthetic_samples
from worker.hipp.models.builtin import is_testbed
from worker.hipp.testbed.data import calibration_samples as world_calibration_samples

#: Seed offset of the world's calibration stream (the world's other streams use other names, not other seeds).
WORLD_CALIBRATION_SEED = 1234


@dataclass(frozen=True)
class CalibrationChoice:
    samples: list[CalibrationSample]
    #: ``world`` (in-distribution, the testbed), ``synthetic`` (shape scenes) or ``images`` (the caller's).
    source: str
    #: Set when the samples are not from the model's own distribution.
    warning: str | None = None


def choose_calibration(reference: str, count: int, seed: int = 0) -> CalibrationChoice:
    """The calibration samples for the model ``reference`` (see the module doc)."""
    if is_testbed(reference):
        return CalibrationChoice(world_calibration_samples(count, seed=seed + WORLD_CALIBRATION_SEED), "world")
    return CalibrationChoice(
        synthetic_samples(count, seed=seed), "synthetic",
        warning=f"{reference} was calibrated on synthetic shape scenes, not on data of its own distribution; "
        "importance scores and the plan may differ from what real images would give",
    )


def samples_from_images(paths: Sequence[Path], count: int) -> CalibrationChoice:
    """The first ``count`` of ``paths`` (sorted; all of them when there are fewer), each with a default
    calibration question in turn, read as RGB."""
    chosen = sorted(paths)[:count]
    samples = []
    for i, path in enumerate(chosen):
        with Image.open(path) as img:
            samples.append(CalibrationSample(img.convert("RGB"), DEFAULT_QUESTIONS[i % len(DEFAULT_QUESTIONS)]))
    return CalibrationChoice(samples, "images")


def default_samples(reference: str, count: int = 32, seed: int = 0) -> list[CalibrationSample]:
    """Just the samples of :func:`choose_calibration`."""
    return choose_calibration(reference, count, seed).samples
