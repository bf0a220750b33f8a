"""Calibration data and the activation statistics that data-aware criteria need.

Calibration prompts are image + question pairs turned into model inputs with the family's prompt format.
Statistics are collected with forward pre-hooks on the consumers of the prunable units (``o_proj`` for
heads, ``down_proj`` for MLP channels), counting only real (non-padding) tokens; batch size and sequence
length are capped so calibration never runs out of memory. :func:`stream_consumer_inputs` is the one driver
of those hooks: a criterion's statistics (squared norms here, FLAP's means and variances) are a sink it feeds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter

DEFAULT_QUESTIONS = (
    "Is there a red circle in the image?",
    "What colour is the square?",
    "How many objects are there?",
    "Is there a blue triangle on the left?",
    "Describe the picture.",
)
_COLOURS = ((220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (150, 60, 180), (240, 140, 30))


@dataclass(frozen=True)
class CalibrationSample:
    image: Image.Image
    question: str


def synthetic_samples(count: int, seed: int = 0, size: int = 64) -> list[CalibrationSample]:
    """Simple shape scenes for models that come without calibration data (random-weight built-ins)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x, y, r = rng.randint(0, size - 1), rng.randint(0, size - 1), rng.randint(size // 10, size // 4)
            box = (x - r, y - r, x + r, y + r)
            colour = rng.choice(_COLOURS)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        samples.append(CalibrationSample(image, rng.choice(DEFAULT_QUESTIONS)))
    return samples


def iter_batches(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    batch_size: int = 8,
    max_length: int | None = 1024,
) -> Iterator[dict[str, torch.Tensor]]:
    """Processor outputs for ``samples`` in batches, on the model's device.

    ``max_length`` caps the sequence; prompts longer than that are truncated on the left only when they
    would cut image tokens, so they are dropped instead (an image must stay whole for the model).
    """
    processor = loaded.processor
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts = [loaded.adapter.format_prompt(processor, s.question) for s in chunk]
        inputs: Any = processor(text=texts, images=[s.image for s in chunk], return_tensors="pt", padding=True)
        batch = {k: v.to(loaded.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        batch = loaded.adapter.prepare_inputs(batch)
        if max_length is not None and batch["input_ids"].shape[1] > max_length:
            batch = _keep_tail(batch, max_length)
        if torch.is_floating_point(batch.get("pixel_values", torch.zeros(0))):
            batch["pixel_values"] = batch["pixel_values"].to(next(loaded.model.parameters()).dtype)
        yield batch


def _keep_tail(batch: dict[str, torch.Tensor], max_length: int) -> dict[str, torch.Tensor]:
    # Left-padded prompts keep their question at the end; only padding and leading text are cut.
    cut = batch["input_ids"].shape[1] - max_length
    if bool((batch["attention_mask"][:, :cut] != 0).any()):
        return batch
    # Every per-token tensor (input_ids, attention_mask, mm_token_type_ids, ...) has input_ids' shape.
    shape = batch["input_ids"].shape
    return {k: (v[:, cut:] if v.shape == shape else v) for k, v in batch.items()}


@dataclass
class LayerActivations:
    """Sum of squared inputs per channel of the head and MLP consumers, over ``tokens`` real tokens."""

    o_proj_sq: torch.Tensor
    down_proj_sq: torch.Tensor
    tokens: int

    @property
    def o_proj_norm(self) -> torch.Tensor:
        return self.o_proj_sq.sqrt()

    @property
    def down_proj_norm(self) -> torch.Tensor:
        return self.down_proj_sq.sqrt()


#: Receives (layer index, ``"o_proj"`` or ``"down_proj"``, the consumer's input rows of real tokens ``[n, width]``).
ConsumerSink = Callable[[int, str, torch.Tensor], None]
CONSUMERS = ("o_proj", "down_proj")


@torch.no_grad()
def stream_consumer_inputs(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    sink: ConsumerSink,
    batch_size: int = 8,
    max_length: int | None = 1024,
    reporter: Reporter = SILENT,
) -> int:
    """Run ``samples`` through the model and hand ``sink`` the inputs of every layer's o_proj and down_proj,
    padding tokens dropped. Returns the number of real tokens seen."""
    token_mask: dict[str, torch.Tensor] = {}

    def hook(layer: int, name: str):  # type: ignore[no-untyped-def]
        def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            sink(layer, name, x.reshape(-1, x.shape[-1])[token_mask["mask"].reshape(-1)])

        return record

    handles = [getattr(la, name).register_forward_pre_hook(hook(i, name))
               for i, la in enumerate(loaded.adapter.layers()) for name in CONSUMERS]
    tokens = 0
    try:
        batches = list(iter_batches(loaded, samples, batch_size, max_length))
        for batch in reporter.track(batches, message="calibration batches"):
            token_mask["mask"] = batch["attention_mask"].bool()
            loaded.model(**batch)
            tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return tokens


@torch.no_grad()
def collect_activations(
    loaded: LoadedModel,
    samples: Sequence[CalibrationSample],
    batch_size: int = 8,
    max_length: int | None = 1024,
    reporter: Reporter = SILENT,
) -> list[LayerActivations]:
    """Run the calibration set and return per-layer input statistics of ``o_proj`` and ``down_proj``."""
    layers = loaded.adapter.layers()
    stats = [
        LayerActivations(
            torch.zeros(la.o_proj.in_features, dtype=torch.float64),
            torch.zeros(la.down_proj.in_features, dtype=torch.float64),
            0,
        )
        for la in layers
    ]

    def accumulate(layer: int, name: str, rows: torch.Tensor) -> None:
        target = stats[layer].o_proj_sq if name == "o_proj" else stats[layer].down_proj_sq
        target += (rows.double() ** 2).sum(0).cpu()

    tokens = stream_consumer_inputs(loaded, samples, accumulate, batch_size, max_length, reporter)
    for st in stats:
        st.tokens = tokens
    return stats
