"""The testbed's architecture: a small LLaVA (CLIP-style ViT, 2-layer GELU projector, Llama decoder with GQA).

The vision features LLaVA selects are the last encoder layer with the class token kept ("full"), so the
language model can read a global summary from one token as well as per-patch features.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from worker.hipp.data.world import IMAGE_SIZE
from worker.hipp.testbed.tokenizer import BOS, EOS, IMAGE, NUM_IMAGE_TOKENS, PAD, PATCH_SIZE

VISION_WIDTH = 128
TEXT_WIDTH = 128
TEXT_LAYERS = 6
TEXT_HEADS = 8
TEXT_KV_HEADS = 4


def build_config(vocab: dict[str, int], text_layers: int = TEXT_LAYERS) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=4 * VISION_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION_WIDTH,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=3 * TEXT_WIDTH,
        num_hidden_layers=text_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab[IMAGE],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )


def build_model(vocab: dict[str, int], text_layers: int = TEXT_LAYERS) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(build_config(vocab, text_layers))
