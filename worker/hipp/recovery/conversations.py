"""Training conversations for recovery: LLaVA's JSON conversation format, the world's training split, encoding.

A conversation is one image plus (question, answer) turns. Sources:

- :func:`load_llava_json` reads LLaVA's instruction-tuning format
  ``[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}]``;
- :func:`world_conversations` draws POPE- and ScienceQA-style questions about the benchmark world's training
  split (the image streams the testbed trained on, never the evaluation ones);
- :func:`write_llava_json` writes conversations back in LLaVA's format (to hand a data set to another tool).

:func:`encode_conversation` turns a conversation into model inputs with the model's own prompt format (its chat
template when the processor has one, else the adapter's single-turn prompt) and labels that supervise only the
answer tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.hipp.errors import OptionError
from worker.hipp.models.loading import LoadedModel

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Conversation:
    """One image (an opened image, a path, or none) and its (human, gpt) turns, placeholder removed."""

    turns: tuple[tuple[str, str], ...]
    image: Image.Image | Path | None = None
    id: str = ""

    def load_image(self) -> Image.Image | None:
        if self.image is None or isinstance(self.image, Image.Image):
            return self.image
        try:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        except OSError as exc:
            raise OptionError(f"conversation {self.id!r}: cannot read image {self.image}: {exc}") from None


# --- LLaVA JSON ----------------------------------------------------------------------------------------


def load_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Conversation]:
    """Conversations from a LLaVA-format JSON file; image paths are relative to ``image_folder``
    (default: the JSON file's folder)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    try:
        records = json.loads(path.read_text())
    except OSError as exc:
        raise OptionError(f"cannot read conversations file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise OptionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise OptionError(f"{path}: expected a JSON list of conversations (LLaVA format), got {type(records).__name__}")
    conversations = [_parse_record(record, i, folder, path) for i, record in enumerate(records)]
    if not conversations:
        raise OptionError(f"{path} holds no conversations")
    return conversations


def _parse_record(record: Any, index: int, folder: Path, path: Path) -> Conversation:
    where = f"{path} entry {index}"
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise OptionError(f"{where}: expected an object with a 'conversations' list")
    ident = str(record.get("id", index))
    messages = record["conversations"]
    if len(messages) < 2 or len(messages) % 2:
        raise OptionError(f"{where} ({ident}): needs alternating human/gpt messages, got {len(messages)}")
    turns = []
    for k in range(0, len(messages), 2):
        human, gpt = messages[k], messages[k + 1]
        roles = (human.get("from") if isinstance(human, dict) else None,
                 gpt.get("from") if isinstance(gpt, dict) else None)
        if roles != ("human", "gpt"):
            raise OptionError(f"{where} ({ident}): messages {k}-{k + 1} come from {roles}, expected human then gpt")
        question, answer = str(human.get("value", "")), str(gpt.get("value", ""))
        # The image is re-inserted by the model's own prompt format; LLaVA writes it as "<image>\n" in turn 1.
        question = question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
        if not answer.strip():
            raise OptionError(f"{where} ({ident}): gpt message {k + 1} is empty; nothing to supervise")
        turns.append((question, answer.strip()))
    image = record.get("image")
    return Conversation(tuple(turns), folder / str(image) if image else None, ident)


def write_llava_json(conversations: Sequence[Conversation], path: str | Path) -> Path:
    """Write ``conversations`` in LLaVA's format; in-memory images are saved as PNG next to the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for i, conv in enumerate(conversations):
        ident = conv.id or f"conv_{i:06d}"
        record: dict[str, Any] = {"id": ident}
        if isinstance(conv.image, Image.Image):
            images = path.parent / "images"
            images.mkdir(exist_ok=True)
            conv.image.save(images / f"{ident}.png")
            record["image"] = f"images/{ident}.png"
        elif conv.image is not None:
            record["image"] = str(conv.image)
        messages = []
        for k, (question, answer) in enumerate(conv.turns):
            prefix = IMAGE_PLACEHOLDER + "\n" if k == 0 and conv.image is not None else ""
            messages += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        record["conversations"] = messages
        records.append(record)
    path.write_text(json.dumps(records, indent=1))
    return path


# --- the benchmark world's training split -------------------------------------------------------------


def world_conversations(count: int, seed: int = 0, sqa_share: float = 0.45) -> list[Conversation]:
    """``count`` single-turn conversations about the world's training images: POPE-style yes/no questions
    (balanced, negatives drawn as the random/popular/adversarial splits do) and ScienceQA-style problems.

    The scenes come from the ``train`` streams the testbed was trained on, so no evaluation image is seen.
    """
    from worker.hipp.data.world import generate_scenes, render
    from worker.hipp.evaluation.tasks import pope, scienceqa
    from worker.hipp.evaluation.tasks.pope import ObjectStats

    if count < 1:
        raise OptionError(f"need at least one training conversation, got {count}")
    n_sqa = round(count * sqa_share)
    n_pope = count - n_sqa
    scenes = generate_scenes(seed, max(n_pope, 1), "train")
    stats = ObjectStats.from_scenes(scenes)
    rng = random.Random(f"{seed}:recovery")
    out: list[Conversation] = []
    for scene in scenes[:n_pope]:
        if rng.random() < 0.5:
            category, answer = rng.choice(scene.categories), "Yes"
        else:
            split = rng.choice(pope.SPLITS)
            # Any of the split's top negatives (not always the first) so the data is not one question per image.
            category = rng.choice(pope.negatives_for(split, scene.categories, 3, stats, rng))
            answer = "No"
        question = pope.prompt_text(pope.question_text(category))
        out.append(Conversation(((question, answer),), render(scene), scene.image_id))
    for scene, problem in scienceqa.generate_problems(seed, n_sqa, "train", stats):
        question = scienceqa.prompt_text(problem.question, problem.choices, problem.hint)
        out.append(Conversation(((question, scienceqa.OPTIONS[problem.answer]),), render(scene), problem.pid))
    # Interleave the two kinds deterministically so any prefix of the data mixes both.
    random.Random(f"{seed}:recovery:order").shuffle(out)
    return out


# --- encoding ------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    """Token ids and labels (answer tokens only, others ``IGNORE_INDEX``) plus the image tensors."""

    input_ids: torch.Tensor  # long [seq]
    labels: torch.Tensor  # long [seq]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-example tensors with batch dim 1

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _has_chat_template(processor: Any) -> bool:
    tokenizer = getattr(processor, "tokenizer", processor)
    return bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))


def _segments(loaded: LoadedModel, conv: Conversation, use_template: bool) -> list[tuple[str, str]]:
    """(prompt text, prompt + answer text) for each example the conversation becomes."""
    processor = loaded.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    if use_template:
        messages: list[dict[str, Any]] = []
        pairs = []
        for k, (question, answer) in enumerate(conv.turns):
            content: list[dict[str, str]] = [{"type": "image"}] if k == 0 and conv.image is not None else []
            messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
            prompt = str(processor.apply_chat_template(messages, add_generation_prompt=True))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            pairs.append((prompt, str(processor.apply_chat_template(messages, add_generation_prompt=False))))
        # One example with every answer supervised: the last pair's full text contains all the others.
        return pairs
    # No chat template: the adapter only knows single-turn prompts, so each turn is its own example.
    eos = str(getattr(tokenizer, "eos_token", "") or "")
    out = []
    for question, answer in conv.turns:
        prompt = loaded.adapter.format_prompt(processor, question)
        out.append((prompt, f"{prompt} {answer}{eos}"))
    return out


def _tokenize(loaded: LoadedModel, text: str, image: Image.Image | None) -> dict[str, torch.Tensor]:
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    inputs: Any = loaded.processor(**kwargs)
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def encode_conversation(loaded: LoadedModel, conv: Conversation, max_length: int | None = None) -> list[EncodedExample]:
    """The conversation as training examples for ``loaded``'s processor; answer tokens supervised only.

    Examples longer than ``max_length`` are cut at the end; an example that would lose image tokens or every
    answer token is dropped (an image must stay whole for the model).
    """
    use_template = _has_chat_template(loaded.processor)
    if conv.image is None and not use_template:
        raise OptionError(
            f"conversation {conv.id!r} has no image and the processor has no chat template; "
            "the adapter's prompt format needs an image"
        )
    image = conv.load_image()
    segments = _segments(loaded, conv, use_template)
    # With a chat template the whole conversation is one example (its last text contains every turn);
    # without one, each turn is its own example.
    groups = [(segments[-1][1], segments)] if use_template else [(text, [(p, text)]) for p, text in segments]
    encoded = []
    for full_text, spans in groups:
        full = _tokenize(loaded, full_text, image)
        ids = full["input_ids"][0]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for start, stop in _answer_spans(loaded, conv, ids, full_text, spans, image):
            labels[start:stop] = ids[start:stop]
        example = _truncate(loaded, ids, labels, max_length)
        if example is not None:
            extras = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
            encoded.append(EncodedExample(example[0], example[1], extras))
    return encoded


def _answer_spans(
    loaded: LoadedModel, conv: Conversation, ids: torch.Tensor, full_text: str, spans: list[tuple[str, str]],
    image: Image.Image | None,
) -> list[tuple[int, int]]:
    """[start, stop) of each answer in ``ids`` (the processor's tokens of ``full_text``, image expanded).

    Fast path: tokenize the texts with the tokenizer alone (no image processing) and shift by the number of
    tokens the image expansion added, after checking the expansion lies wholly before every answer. Otherwise
    every prefix goes through the processor with the image (slower, exact).
    """
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    if callable(tokenizer):
        plain = list(tokenizer(full_text)["input_ids"])
        delta = len(ids) - len(plain)
        out = []
        for prompt, upto in spans:
            p_ids, u_ids = list(tokenizer(prompt)["input_ids"]), list(tokenizer(upto)["input_ids"])
            if plain[: len(p_ids)] != p_ids or plain[: len(u_ids)] != u_ids:
                break
            if ids[len(p_ids) + delta :].tolist() != plain[len(p_ids) :]:
                break
            out.append((len(p_ids) + delta, len(u_ids) + delta))
        else:
            return out
    out = []
    for prompt, upto in spans:
        p_full = _tokenize(loaded, prompt, image)["input_ids"][0]
        u_full = _tokenize(loaded, upto, image)["input_ids"][0]
        if not (torch.equal(ids[: len(p_full)], p_full) and torch.equal(ids[: len(u_full)], u_full)):
            raise OptionError(
                f"conversation {conv.id!r}: the prompt format does not tokenize turn by turn as a prefix of "
                "the whole conversation, so answer tokens cannot be located"
            )
        out.append((len(p_full), len(u_full)))
    return out


def _truncate(
    loaded: LoadedModel, ids: torch.Tensor, labels: torch.Tensor, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    image_id = loaded.adapter.image_token_id
    if int((ids[max_length:] == image_id).sum()) or not bool((labels[:max_length] != IGNORE_INDEX).any()):
        return None
    return ids[:max_length], labels[:max_length]


def encode_all(
    loaded: LoadedModel, conversations: Sequence[Conversation], max_length: int | None = None
) -> list[EncodedExample]:
    """Every conversation encoded; fails when nothing supervisable is left."""
    examples = [ex for conv in conversations for ex in encode_conversation(loaded, conv, max_length)]
    examples = [ex for ex in examples if ex.supervised > 0]
    if not examples:
        raise OptionError(
            "no training example left: every conversation was longer than max_length or had no answer tokens"
        )
    return examples


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` and the concatenated image tensors."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = ex.input_ids
        labels[row, :n] = ex.labels
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    keys = {k for ex in examples for k in ex.extras}
    for key in sorted(keys):
        present = [_pad_per_token(ex.extras[key], len(ex.input_ids), width) for ex in examples if key in ex.extras]
        batch[key] = torch.cat(present, dim=0)
    return batch


def _pad_per_token(value: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """Per-token extras (e.g. Qwen's ``mm_token_type_ids``, shaped like ``input_ids``) are right-padded with
    zeros like the ids; per-image tensors (pixel values, grids) pass through."""
    if value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == length and width > length:
        return torch.nn.functional.pad(value, (0, width - length))
    return value
