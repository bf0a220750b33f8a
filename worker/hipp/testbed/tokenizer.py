"""The testbed's offline word-level tokenizer and LLaVA processor (image processor + chat template).

The vocabulary is every word the testbed's prompts can contain, so the processor needs no download and
``AutoProcessor.from_pretrained(model_dir)`` works from the saved files alone.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from worker.hipp.data.world import CATEGORIES, IMAGE_SIZE, SCENE_TYPES
from worker.hipp.evaluation.tasks.pope import INSTRUCTION as POPE_INSTRUCTION
from worker.hipp.evaluation.tasks.pope import question_text
from worker.hipp.evaluation.tasks.scienceqa import INSTRUCTION as SQA_INSTRUCTION
from worker.hipp.evaluation.tasks.scienceqa import OPTIONS

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
PATCH_SIZE = 16
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Image tokens per image: one per patch plus the class token, which the "full" feature strategy keeps.
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_EXTRA_TEXT = (
    "USER: ASSISTANT: Context: Question: Options: Yes No yes no Yes, there is a No, there is not a "
    "The answer is 0 1 2 3 4 5 6 7 8 9 left right of the image? an in on or which what how many"
    " Which of these objects is in the image? How many are in the image? Is the on the left or the right"
)


def vocabulary_texts() -> list[str]:
    """Every text the testbed's prompts and answers can contain."""
    texts = [POPE_INSTRUCTION, SQA_INSTRUCTION, _EXTRA_TEXT, " ".join(OPTIONS)]
    for c in CATEGORIES:
        texts += [question_text(c.name), c.name, c.plural, f"How many {c.plural} are in the image?"]
        texts.append(f"Is the {c.name} on the left or the right of the image?")
    texts += [t.name for t in SCENE_TYPES]
    return texts


def build_vocabulary() -> dict[str, int]:
    pre = pre_tokenizers.Whitespace()
    words: dict[str, None] = {}
    for text in vocabulary_texts():
        for word, _ in pre.pre_tokenize_str(text):
            words[word] = None
    tokens = list(SPECIAL_TOKENS) + sorted(w for w in words if w not in SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: whitespace/punctuation split, ``<s>`` prepended, words joined on decode."""
    vocab = build_vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # The WordPiece decoder joins words with spaces and, with cleanup, drops the space before punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def build_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_processor() -> LlavaProcessor:
    """The testbed's LLaVA processor: one ``<image>`` expands to NUM_IMAGE_TOKENS tokens (patches + CLS)."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,
    )
