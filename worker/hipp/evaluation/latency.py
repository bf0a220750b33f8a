"""The latency every job records: prefill and decode of one fixed prompt (an image and a question through the
model's own processor), timed on the model's device through the fast decode path of ``models.decoding``."""

from __future__ import annotations

from typing import Any

import torch

from worker.hipp.data.calibration import iter_batches, synthetic_samples
from worker.hipp.models.decoding import DecodeOptions, measure_latency
from worker.hipp.models.loading import LoadedModel


def fixed_prompt(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """The prompt every job's latency is timed on (the same for the dense and the pruned model)."""
    return dict(next(iter_batches(loaded, synthetic_samples(1, seed=0), batch_size=1)))


def prompt_latency(loaded: LoadedModel, options: DecodeOptions = DecodeOptions()) -> dict[str, Any]:
    """:func:`~worker.hipp.models.decoding.measure_latency` of :func:`fixed_prompt` on ``loaded``'s device."""
    return measure_latency(loaded.model, fixed_prompt(loaded), options=options)
