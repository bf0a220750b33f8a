"""Qwen VL family adapter: ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2VLForConditionalGeneration``.

transformers 5 nests the language model at ``model.model.language_model`` (a bare decoder); its layers follow
the Llama naming the base ``LayerAdapter`` expects, with biases on q/k/v (not on o_proj) and grouped-query
attention with few KV heads (2 in the 3B model), so plans keep equal query heads per kept KV group.
``head_dim`` is derived from hidden size / heads at construction and stays fixed when heads are removed.

Inputs differ from LLaVA in two ways the engine must respect:
- an image is ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch (``image_grid_thw`` / merge^2)
  + ``<|vision_end|>``; only the pad positions carry image features;
- positions are 3-D (multimodal RoPE). The model computes them only when ``mm_token_type_ids`` and
  ``image_grid_thw`` are passed; without them it silently falls back to 1-D text positions, so
  :meth:`prepare_inputs` fills ``mm_token_type_ids`` in when a processor did not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from worker.hipp.models.adapters.base import ModelAdapter, register_adapter

log = logging.getLogger(__name__)

# Values of mm_token_type_ids (transformers' ProcessorMixin.create_mm_token_type_ids).
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@register_adapter
class QwenVLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_5_vl", "qwen2_vl")

    @classmethod
    def load_processor(cls, source: str, model_type: str, *, trust_remote_code: bool) -> Any:
        """The stock processor where it can be built; otherwise the same processing without its video half.

        transformers 5 builds a Qwen2-VL-family processor with a video processor that needs torchvision, and
        checkpoints saved without one (or laid out like the hub, without ``video_preprocessor_config.json``)
        cannot build it at all. Still images never use it, so the image-only processor reads the same files.
        """
        from transformers import AutoProcessor

        from worker.hipp.models.processing_qwen_images import image_only_processor_class

        try:
            return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (ImportError, OSError, ValueError, AttributeError) as exc:
            fallback = image_only_processor_class(model_type)
            log.info("%s: stock processor unavailable (%s); using %s", source, type(exc).__name__, fallback.__name__)
            try:
                return fallback.from_pretrained(source)
            except Exception as fallback_exc:
                raise exc from fallback_exc

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    def image_token_mask(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The <|image_pad|> positions (what mm_token_type_ids marks as image): the vision start/end markers
        # around them are ordinary text embeddings and are not image tokens.
        return inputs["input_ids"] == self.image_token_id

    def prepare_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "mm_token_type_ids" not in inputs and "input_ids" in inputs:
            ids = inputs["input_ids"]
            types = torch.full_like(ids, TEXT_TYPE)
            types[ids == self.image_token_id] = IMAGE_TYPE
            types[ids == self.video_token_id] = VIDEO_TYPE
            inputs = {**inputs, "mm_token_type_ids": types}
        return inputs

    @classmethod
    def fallback_prompt(cls, question: str) -> str:
        # ChatML as Qwen's own template renders it (without the default system turn).
        return (
            f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
