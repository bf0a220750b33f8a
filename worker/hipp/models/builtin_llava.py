"""The built-in tiny LLaVA models: made from a config in seconds, random weights, an offline word-level
tokenizer. They exercise every code path without any download. Also the word list and the norm randomization
the other built-in families share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
BASE_WORDS = [
    "user", "assistant", ":", ".", ",", "?", "yes", "no", "is", "there", "a", "an", "the", "in", "image",
    "picture", "what", "colour", "color", "shape", "how", "many", "of", "on", "left", "right", "top",
    "bottom", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle", "square",
    "triangle", "star", "cross", "object", "objects", "answer", "with", "option", "letter", "from", "given",
    "choices", "directly", "A", "B", "C", "D", "E"
]


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shape of a built-in random-weight LLaVA. Defaults are deliberately tiny (tests run in seconds)."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 64
    image_size: int = 32
    patch_size: int = 8
    attention_bias: bool = False
    mlp_bias: bool = False
    vocab_words: tuple[str, ...] = tuple(BASE_WORDS)
    #: Embedding rows beyond the tokenizer's (e.g. 32000 for a realistic LM head cost); None: the tokenizer's.
    vocab_size: int | None = None
    seed: int = 0


def build_word_tokenizer(words: list[str] | tuple[str, ...]) -> Any:
    """An offline word-level fast tokenizer over ``SPECIAL_TOKENS + words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.padding_side = "left"
    return fast


def build_tiny_llava(spec: TinyLlavaSpec = TinyLlavaSpec(), device: str = "cpu") -> tuple[nn.Module, Any]:
    """A random-weight ``LlavaForConditionalGeneration`` and its processor, seeded; built on ``device``
    (a 7B-shaped model is initialised on the GPU directly)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    tokenizer = build_word_tokenizer(spec.vocab_words)
    vocab_size = max(len(tokenizer), spec.vocab_size or 0)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim or spec.hidden_size // spec.num_heads,
        max_position_embeddings=512,
        attention_bias=spec.attention_bias,
        mlp_bias=spec.mlp_bias,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    num_patches = (spec.image_size // spec.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        vision_feature_layer=-1,
    )
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    randomize_norms(model, spec.seed)
    model.eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


def randomize_norms(model: nn.Module, seed: int) -> None:
    """Give norm weights and biases non-trivial values so that pruning bugs change logits visibly."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
