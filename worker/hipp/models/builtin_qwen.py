"""Built-in tiny Qwen2.5-VL / Qwen2-VL models: random weights, offline tokenizer, the family's real processor.

They keep what makes the family different from LLaVA, at a size that runs in seconds on a CPU:
grouped-query attention with few KV heads (8 query heads over 2 KV heads, like the 3B model's 16 over 2),
q/k/v biases without an o_proj bias, multimodal RoPE (``mrope_section`` sums to ``head_dim / 2``),
a windowed vision tower whose patches are merged 2x2 before the projector, and a processor that expands
``<|image_pad|>`` per ``image_grid_thw`` and returns ``mm_token_type_ids``. The chat template is Qwen's own
(ChatML with ``<|vision_start|><|image_pad|><|vision_end|>`` per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker.hipp.models.builtin_llava import BASE_WORDS, randomize_norms

PAD, UNK = "<|endoftext|>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
# Words of the default system prompt and of common prompts, on top of the LLaVA built-ins' words.
EXTRA_WORDS = ("system", "you", "are", "helpful", "describe", "single", "word", "phrase", "using", "question")

# Qwen2-VL / Qwen2.5-VL's chat template as shipped with the instruct checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Shape of a built-in random-weight Qwen VLM. ``version`` is ``"2.5"`` or ``"2"``."""

    version: str = "2.5"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 128
    # Qwen derives head_dim = hidden_size / num_heads (8 here); the three mRoPE sections (temporal, height,
    # width) split its head_dim / 2 rotary frequencies.
    mrope_section: tuple[int, int, int] = (1, 1, 2)
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 64
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    # Images are resized to at most this many pixels: 32x32 -> 8x8 patches -> 16 image tokens after merging.
    max_pixels: int = 32 * 32
    min_pixels: int = 16 * 16
    seed: int = 0


def build_qwen_tokenizer(words: tuple[str, ...] = (*BASE_WORDS, *EXTRA_WORDS)) -> Any:
    """An offline word-level fast tokenizer with Qwen's special tokens (lower-cased words, no BOS added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *(w.lower() for w in words)]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Special tokens are split off before normalization, so lower-casing never touches <|image_pad|>.
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # Registered on the backend itself so that "<|im_start|>user" never reaches the punctuation splitter.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
    )
    fast.padding_side = "left"
    return fast


def build_tiny_qwen(spec: TinyQwenSpec = TinyQwenSpec()) -> tuple[nn.Module, Any]:
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (or Qwen2-VL) and its processor, seeded."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from worker.hipp.models.processing_qwen_images import Qwen2_5_VLImageOnlyProcessor, Qwen2VLImageOnlyProcessor

    tokenizer = build_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)},
        # Qwen has no BOS in its prompts; its config names <|endoftext|> as BOS and PAD.
        "bos_token_id": ids[PAD],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD],
    }
    tokens = {
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
    }
    vision_common = {
        "depth": spec.vision_depth,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    model: nn.Module
    torch.manual_seed(spec.seed)
    if spec.version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = {
            **vision_common,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "out_hidden_size": spec.hidden_size,
            # One merged-patch window of 2x2 merged patches, full attention in the last block: both vision
            # attention paths run.
            "window_size": spec.patch_size * spec.merge_size * 2,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        )
        processor_cls: Any = Qwen2_5_VLImageOnlyProcessor
    elif spec.version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = {**vision_common, "embed_dim": spec.vision_hidden, "hidden_size": spec.hidden_size, "mlp_ratio": 2}
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
        processor_cls = Qwen2VLImageOnlyProcessor
    else:
        raise ValueError(f"unknown Qwen VL version {spec.version!r}; use '2.5' or '2'")
    randomize_norms(model, spec.seed)
    model.eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size,
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
    )
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor
