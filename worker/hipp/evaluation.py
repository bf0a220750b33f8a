"""Batched evaluation of a VLM on POPE and ScienceQA: prompt templates, scoring from logits and from generation.

Placeholder: filled in below the prompt helpers.
"""

from __future__ import annotations

POPE_INSTRUCTION = "Answer the question using a single word or phrase."
SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D", "E")


def pope_prompt_text(question: str) -> str:
    """LLaVA-1.5's POPE prompt: the question, then the short-answer instruction."""
    return f"{question}\n{POPE_INSTRUCTION}"


def sqa_prompt_text(question: str, choices: tuple[str, ...] | list[str], hint: str = "") -> str:
    """LLaVA-1.5's ScienceQA prompt: context (if any), question, lettered options, the letter instruction."""
    lines = [f"Context: {hint}"] if hint else []
    lines.append(question)
    lines.extend(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    lines.append(SQA_INSTRUCTION)
    return "\n".join(lines)
