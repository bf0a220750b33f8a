"""Tiny checkpoints built the way users' checkpoints are: stock transformers classes, ``save_pretrained``.

Nothing here imports the project: these folders stand for what a user brings (a LLaVA-1.5-style model, a
Qwen2.5-VL or Qwen2-VL saved by stock transformers, or laid out like the hub's Qwen repositories). Run as a
script to write one: ``python tests/stock_checkpoints.py qwen2.5-vl-stock OUT``.

Layouts of the Qwen family:
- ``stock``: what ``Qwen2_5_VLProcessor.save_pretrained`` writes in transformers 5: tokenizer files,
  ``chat_template.jinja`` and one ``processor_config.json`` that nests the image and the video processor's
  settings. The stock processor cannot be constructed without torchvision (its video half needs it), so the
  file is written from the image processor's own ``to_dict`` and the video processor's settings in the shape
  ``ProcessorMixin.to_dict`` gives them.
- ``hub``: the layout of the published Qwen2-VL / Qwen2.5-VL repositories: ``preprocessor_config.json``
  (image processor only, no video file), ``chat_template.json``, tokenizer files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' '}}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _byte_level_bpe_tokenizer(cls: Any, specials: list[str], **kwargs: Any) -> Any:
    """A byte-level BPE tokenizer of ``cls`` with the 256 byte tokens, a few merges and ``specials``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s"), ("Ġ", "a")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = cls(vocab=vocab, merges=merges, **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases so that a wrong slice changes logits visibly."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def build_qwen_vl(out: str | Path, *, version: str = "2.5", layout: str = "stock", tie_embeddings: bool = False,
                  dtype: str = "float32", seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL (``version="2.5"``) or Qwen2-VL (``"2"``) with GQA, saved by stock code."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe_tokenizer(Qwen2Tokenizer, QWEN_SPECIALS[1:])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": tie_embeddings}
    tokens = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "tie_word_embeddings": tie_embeddings}
    vision_common = {"depth": 2, "num_heads": 4, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    torch.manual_seed(seed)
    model: Any
    if version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = {**vision_common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                  "window_size": 16, "fullatt_block_indexes": [1]}
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))
        processor_class = "Qwen2_5_VLProcessor"
    elif version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = {**vision_common, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
        processor_class = "Qwen2VLProcessor"
    else:
        raise ValueError(f"unknown Qwen VL version {version!r}")
    _randomize(model, seed)
    model.to(DTYPES[dtype]).save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                               size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    tokenizer.save_pretrained(out)
    if layout == "stock":
        image = {**image_processor.to_dict(), "image_processor_type": "Qwen2VLImageProcessor"}
        video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 4, "temporal_patch_size": 2,
                 "merge_size": 2, "size": {"shortest_edge": 16 * 16, "longest_edge": 32 * 32 * 4},
                 "image_mean": image["image_mean"], "image_std": image["image_std"], "do_sample_frames": False}
        (out / "processor_config.json").write_text(json.dumps(
            {"image_processor": image, "video_processor": video, "processor_class": processor_class}, indent=2))
        (out / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    elif layout == "hub":
        image = {**image_processor.to_dict(), "image_processor_type": "Qwen2VLImageProcessor",
                 "processor_class": processor_class}
        (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
        (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2))
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'stock' or 'hub'")
    return out


@dataclass(frozen=True)
class LlavaShape:
    hidden: int = 64
    layers: int = 3
    heads: int = 8
    intermediate: int = 160
    #: Embedding rows (None: the tokenizer's); 32064 gives a LLaVA-1.5-sized embedding and head.
    vocab_size: int | None = None
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 64
    image_size: int = 32
    patch_size: int = 8


#: About 1.5B parameters: a LLaVA-1.5-style decoder of 24 layers at d=2048 with a ViT-B-sized tower.
LLAVA_1_5B = LlavaShape(hidden=2048, layers=24, heads=16, intermediate=5632, vocab_size=32064, vision_hidden=768,
                        vision_layers=12, vision_heads=12, vision_intermediate=3072, image_size=112, patch_size=14)


def build_llava(out: str | Path, *, dtype: str = "float32", seed: int = 0, shape: LlavaShape = LlavaShape()) -> Path:
    """A llava-1.5-style random-weight LLaVA (vision_feature_layer -2, default select strategy) saved stock."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    tokenizer = _llama_tokenizer()
    text = LlamaConfig(vocab_size=max(len(tokenizer), shape.vocab_size or 0), hidden_size=shape.hidden,
                       intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size,
                              projection_dim=shape.vision_hidden)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), image_seq_length=(shape.image_size // shape.patch_size) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    # Built directly in the target dtype: a 1.5B model in float32 first would need twice the memory.
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    _randomize(model, seed)
    model.save_pretrained(out)
    del model
    size = {"shortest_edge": shape.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size={"height": shape.image_size,
                                                                     "width": shape.image_size}),
        tokenizer=tokenizer, patch_size=shape.patch_size, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def _llama_tokenizer() -> Any:
    from transformers import LlamaTokenizer

    words = ["user", "assistant", "yes", "no", "is", "there", "a", "the", "in", "image", "what", "colour", "red",
             "green", "blue", "circle", "square", "answer", "?", ":", "."]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    for w in words:
        vocab.setdefault("▁" + w, len(vocab))
        vocab.setdefault(w, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


BUILDERS = {
    "llava": lambda out, dtype: build_llava(out, dtype=dtype),
    "llava-1.5b": lambda out, dtype: build_llava(out, dtype=dtype, shape=LLAVA_1_5B),
    "qwen2.5-vl-stock": lambda out, dtype: build_qwen_vl(out, version="2.5", layout="stock", dtype=dtype),
    "qwen2.5-vl-stock-tied": lambda out, dtype: build_qwen_vl(out, version="2.5", layout="stock",
                                                              tie_embeddings=True, dtype=dtype),
    "qwen2.5-vl-hub": lambda out, dtype: build_qwen_vl(out, version="2.5", layout="hub", dtype=dtype),
    "qwen2-vl-hub": lambda out, dtype: build_qwen_vl(out, version="2", layout="hub", dtype=dtype),
    "qwen2-vl-stock": lambda out, dtype: build_qwen_vl(out, version="2", layout="stock", dtype=dtype),
}


if __name__ == "__main__":
    kind, target = sys.argv[1], sys.argv[2]
    BUILDERS[kind](target, sys.argv[3] if len(sys.argv) > 3 else "float32")
    print(target)
