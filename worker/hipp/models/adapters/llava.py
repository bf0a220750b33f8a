"""LLaVA family adapter: ``LlavaForConditionalGeneration`` (and LLaVA-NeXT / OneVision, same layout).

transformers 5 nests the language model at ``model.model.language_model`` (a bare decoder, e.g. LlamaModel,
MistralModel, Qwen2Model), whose layers follow the Llama naming the base ``LayerAdapter`` expects.
"""

from __future__ import annotations

from worker.hipp.models.adapters.base import ModelAdapter, register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava", "llava_next", "llava_onevision")

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        return int(getattr(config, "image_token_id", None) or config.image_token_index)

    @classmethod
    def fallback_prompt(cls, question: str) -> str:
        return f"USER: <image>\n{question} ASSISTANT:"
