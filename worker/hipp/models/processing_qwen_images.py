"""Image-only Qwen2-VL / Qwen2.5-VL processors: the stock processors without their video processor.

transformers 5 builds the stock ``Qwen2_5_VLProcessor`` with a video processor that needs torchvision (its
constructor refuses to run without one), although still images never touch it. These subclasses keep the
stock behaviour for text and images (image-pad expansion from ``image_grid_thw``, ``mm_token_type_ids``,
the chat template) and drop the video slot, so a CPU-only install can calibrate, evaluate and export.

This module imports only transformers: it is copied verbatim next to exported checkpoints (transformers'
custom-object mechanism, see ``register_for_auto_class`` below) and loaded there with
``AutoProcessor.from_pretrained(dir, trust_remote_code=True)``. Do not import the project from here.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor


def _init_image_only(
    processor: Any, image_processor: Any, tokenizer: Any, chat_template: str | None, **kwargs: Any
) -> None:
    # The stock constructors set these and then pass a third (video) sub-processor to ProcessorMixin;
    # ``create_mm_token_type_ids`` needs the video token ids even when no video is ever given.
    processor.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    processor.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    processor.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
        processor.image_token
    )
    processor.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
        processor.video_token
    )
    ProcessorMixin.__init__(processor, image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):  # noqa: N801 (transformers' naming)
    """``Qwen2_5_VLProcessor`` for images and text only (no torchvision needed)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        _init_image_only(self, image_processor, tokenizer, chat_template, **kwargs)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no torchvision needed)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        _init_image_only(self, image_processor, tokenizer, chat_template, **kwargs)


def image_only_processor_class(model_type: str) -> type[ProcessorMixin]:
    """The image-only processor class for a Qwen VL ``model_type`` (``qwen2_5_vl`` or ``qwen2_vl``)."""
    return Qwen2VLImageOnlyProcessor if model_type == "qwen2_vl" else Qwen2_5_VLImageOnlyProcessor


# save_pretrained then copies this file into the checkpoint and records it in processor_config.json's
# auto_map, so the checkpoint stays loadable in a process that has only torch + transformers.
Qwen2_5_VLImageOnlyProcessor.register_for_auto_class("AutoProcessor")
Qwen2VLImageOnlyProcessor.register_for_auto_class("AutoProcessor")
