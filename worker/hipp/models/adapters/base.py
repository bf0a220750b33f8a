"""The abstract model adapter: what the pruning engine needs to know about any VLM family.

The engine never asks "is this Llama?"; it asks the adapter for the decoder layers, the projections of
each layer, the image-token positions of a batch and the prompt format. A family fills these in in one file
under ``worker/hipp/models/adapters/`` and registers itself with :func:`register_adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from worker.hipp.errors import UnsupportedModelError
from worker.hipp.registry import Registry


@dataclass(frozen=True)
class LayerShape:
    """The prunable geometry of one decoder layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class LayerAdapter:
    """A Llama-style decoder layer: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

    Families whose layers are named differently subclass this and override the properties.
    """

    def __init__(self, layer: nn.Module, index: int) -> None:
        self.layer = layer
        self.index = index

    @property
    def attention(self) -> nn.Module:
        return self.layer.self_attn  # type: ignore[return-value]

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp  # type: ignore[return-value]

    def _linear(self, module: nn.Module, name: str) -> nn.Linear:
        linear = getattr(module, name)
        assert isinstance(linear, nn.Linear), f"{name} is {type(linear).__name__}, expected nn.Linear"
        return linear

    @property
    def q_proj(self) -> nn.Linear:
        return self._linear(self.attention, "q_proj")

    @property
    def k_proj(self) -> nn.Linear:
        return self._linear(self.attention, "k_proj")

    @property
    def v_proj(self) -> nn.Linear:
        return self._linear(self.attention, "v_proj")

    @property
    def o_proj(self) -> nn.Linear:
        return self._linear(self.attention, "o_proj")

    @property
    def gate_proj(self) -> nn.Linear:
        return self._linear(self.mlp, "gate_proj")

    @property
    def up_proj(self) -> nn.Linear:
        return self._linear(self.mlp, "up_proj")

    @property
    def down_proj(self) -> nn.Linear:
        return self._linear(self.mlp, "down_proj")

    @property
    def head_dim(self) -> int:
        attn: Any = self.attention
        return int(attn.head_dim)

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.out_features // self.head_dim

    @property
    def intermediate_size(self) -> int:
        return self.down_proj.in_features

    def mlp_producers(self) -> list[nn.Linear]:
        """Linears whose output rows are MLP channels."""
        return [self.gate_proj, self.up_proj]

    def shape(self) -> LayerShape:
        return LayerShape(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            attention_bias=self.q_proj.bias is not None,
            o_bias=self.o_proj.bias is not None,
            mlp_bias=self.down_proj.bias is not None,
        )

    def set_head_counts(self, num_heads: int, num_kv_heads: int) -> None:
        """Update the attributes the attention forward reads after its projections changed size."""
        attn: Any = self.attention
        attn.num_key_value_groups = num_heads // num_kv_heads
        # Some implementations keep these too; keep them truthful when present.
        for name, value in (
            ("num_heads", num_heads),
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
        ):
            if hasattr(attn, name):
                setattr(attn, name, value)


class ModelAdapter(ABC):
    """Where the prunable units of one VLM family are, and how its inputs look."""

    #: Short family name written into plans and checkpoints (e.g. ``"llava"``).
    family: ClassVar[str]
    #: ``config.model_type`` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]]
    layer_adapter_class: ClassVar[type[LayerAdapter]] = LayerAdapter

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = model

    # --- structure -------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm) of the language model. transformers 5 nests it
        at ``model.model.language_model`` for the VLM families; a family laid out otherwise overrides this."""
        inner = getattr(self.model, "model", self.model)
        lm = inner.language_model
        assert isinstance(lm, nn.Module)
        return lm

    @property
    def decoder_layers(self) -> nn.ModuleList:
        layers = self.language_model.layers
        assert isinstance(layers, nn.ModuleList)
        return layers

    @property
    def text_config(self) -> Any:
        """The language model's config (hidden size, heads, layers)."""
        return self.model.config.text_config

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    def layers(self) -> list[LayerAdapter]:
        return [self.layer_adapter_class(layer, i) for i, layer in enumerate(self.decoder_layers)]

    def layer(self, index: int) -> LayerAdapter:
        return self.layer_adapter_class(self.decoder_layers[index], index)

    def layer_shapes(self) -> list[LayerShape]:
        return [layer.shape() for layer in self.layers()]

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def load_processor(cls, source: str, model_type: str, *, trust_remote_code: bool) -> Any:
        """The processor saved with the checkpoint at ``source`` (a directory or hub id). A family whose stock
        processor needs optional packages for inputs the engine never uses overrides this with a fallback."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    # --- inputs ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Token id that marks image positions in ``input_ids`` after the processor expanded them."""

    def image_token_mask(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of the positions that carry image features."""
        return inputs["input_ids"] == self.image_token_id

    def prepare_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Processor outputs made complete for the model's forward (default: unchanged).

        A family whose forward silently degrades without an input some processors omit (e.g. Qwen VL's
        ``mm_token_type_ids``, needed for its 3-D positions) adds it here.
        """
        return inputs

    @classmethod
    def format_prompt(cls, processor: Any, question: str) -> str:
        """A single-turn user prompt with one image, ready for ``processor(text=..., images=...)``.

        A class method, so evaluation code that only has a model and a processor can format prompts through
        ``adapter_class_for(model_type)`` without wrapping the model.
        """
        tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return str(processor.apply_chat_template(messages, add_generation_prompt=True))
        return cls.fallback_prompt(question)

    @classmethod
    @abstractmethod
    def fallback_prompt(cls, question: str) -> str:
        """The family's prompt when the processor ships no chat template."""

    # --- export ----------------------------------------------------------------------------------
    def base_model_type(self) -> str:
        config = self.model.config
        return str(getattr(config, "hipp_base_model_type", None) or config.model_type)


ADAPTERS: Registry[type[ModelAdapter]] = Registry("model type", UnsupportedModelError)


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` the adapter for each of its ``model_types``."""
    return ADAPTERS.register(*cls.model_types)(cls)


def registered_model_types() -> list[str]:
    return sorted(ADAPTERS.names())


def adapter_class_for(model_type: str) -> type[ModelAdapter] | None:
    return ADAPTERS.find(model_type)
