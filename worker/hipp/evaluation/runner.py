"""Batched evaluation of a VLM on POPE and ScienceQA, from logits or from generation.

The tasks (``tasks.pope``, ``tasks.scienceqa``) own the prompts, the answer parsing and the metrics; this module
wraps their prompts in the family's chat format, batches images and prompts through the model, and hands the
tasks what they parse. Two modes share the prompts and batching:
- ``logits`` (fast): one forward pass per batch; each task's answers are scored by their best first-token
  logit (:func:`answer_scores`) and the task picks its answer from those scores (POPE: "Yes" vs "No";
  ScienceQA: the best option letter among the problem's choices).
- ``generate``: greedy decoding, then the tasks' official parsers (text that does not parse counts as wrong).

Prompts are wrapped with the processor's chat template when it has one, else with the family's conversation
format. The plan evaluator scores plans through the same logits path (:func:`pope_predictions`,
:func:`sqa_predictions`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.hipp.errors import OptionError
from worker.hipp.evaluation.intervals import interval, pope_mean, sqa_accuracy
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.pope import PopeMetrics, PopeQuestion
from worker.hipp.evaluation.tasks.scienceqa import SqaMetrics, SqaProblem
from worker.hipp.models.adapters import adapter_class_for
from worker.hipp.progress import SILENT, Reporter

MODES = ("logits", "generate")


def model_family(model: Any) -> str:
    """The model type prompt formats are chosen by (``llava``, ``qwen2_vl``, ...; a pruned export's base type)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "hipp_base_model_type", None) or getattr(config, "model_type", "llava"))


def build_prompt(processor: Any, text: str, family: str = "llava") -> str:
    """One user turn with an image and ``text``, ready for generation, in the family adapter's format."""
    adapter = adapter_class_for(family) or adapter_class_for("llava")
    assert adapter is not None
    return adapter.format_prompt(processor, text)


# --------------------------------------------------------------------------------------------- batching


@dataclass
class Query:
    """One image + prompt to score."""

    image: Image.Image
    text: str


class ImageCache:
    """Loads images by path, keeping the most recent ones (POPE asks six questions per image)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._cache: dict[str, Image.Image] = {}

    def __call__(self, path: str) -> Image.Image:
        if path not in self._cache:
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            try:
                with Image.open(path) as im:
                    self._cache[path] = im.convert("RGB")
            except FileNotFoundError:
                raise OptionError(f"image not found: {path}") from None
        return self._cache[path]


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def model_inputs(model: Any, processor: Any, queries: Sequence[Query], family: str) -> dict[str, Any]:
    tok = _tokenizer(processor)
    side = tok.padding_side
    tok.padding_side = "left"  # the last position of every row is then the generation position
    try:
        inputs = processor(
            images=[q.image for q in queries],
            text=[build_prompt(processor, q.text, family) for q in queries],
            padding=True,
            return_tensors="pt",
        )
    finally:
        tok.padding_side = side
    param = next(model.parameters())
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(param.device)
            if value.is_floating_point():
                value = value.to(param.dtype)
        out[key] = value
    return out


@torch.no_grad()
def next_token_logits(
    model: Any, processor: Any, queries: Sequence[Query], batch_size: int = 32, report: Reporter = SILENT
) -> torch.Tensor:
    """Logits of the first answer token for each query, shape [len(queries), vocab], float32 on CPU."""
    family = model_family(model)
    rows: list[torch.Tensor] = []
    starts = range(0, len(queries), batch_size)
    for start in report.track(starts, total=len(starts), message="score"):
        inputs = model_inputs(model, processor, queries[start : start + batch_size], family)
        logits = model(**inputs, logits_to_keep=1).logits
        rows.append(logits[:, -1].float().cpu())
    if not rows:
        return torch.zeros(0, 0)
    return torch.cat(rows)


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    queries: Sequence[Query],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    report: Reporter = SILENT,
) -> list[str]:
    """Greedy answers (new tokens only, special tokens removed)."""
    family = model_family(model)
    tok = _tokenizer(processor)
    answers: list[str] = []
    starts = range(0, len(queries), batch_size)
    for start in report.track(starts, total=len(starts), message="generate"):
        inputs = model_inputs(model, processor, queries[start : start + batch_size], family)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return answers


def answer_token_ids(processor: Any, words: Sequence[str]) -> list[int]:
    """First-token ids of ``words`` and their space-prefixed spellings (tokenizers differ on which is used)."""
    tok = _tokenizer(processor)
    ids: list[int] = []
    for word in words:
        for spelling in (word, " " + word):
            encoded = tok.encode(spelling, add_special_tokens=False)
            if encoded and encoded[0] != tok.unk_token_id and encoded[0] not in ids:
                ids.append(int(encoded[0]))
    return ids


def answer_ids(processor: Any, answers: Sequence[Sequence[str]], required: bool = False) -> list[list[int]]:
    """First-token ids of each answer a task scores in logits mode (its ``ANSWER_WORDS``). With ``required``,
    an answer the tokenizer cannot spell is a user error (the task cannot be scored from logits)."""
    ids = [answer_token_ids(processor, words) for words in answers]
    missing = [words[0] for words, found in zip(answers, ids, strict=True) if not found]
    if required and missing:
        raise OptionError(f"the tokenizer has no {'/'.join(missing)} token; use mode='generate'")
    return ids


def answer_scores(logits: torch.Tensor, ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per row of first-token ``logits``, each answer's best token logit (-inf for an answer with no token)."""
    if logits.shape[0] == 0:
        return []
    unspellable = torch.full(logits.shape[:1], -math.inf, dtype=logits.dtype)
    columns = [logits[:, group].max(dim=1).values if group else unspellable for group in ids]
    return torch.stack(columns, dim=1).tolist()


def pope_predictions(logits: torch.Tensor, ids: Sequence[Sequence[int]]) -> list[str]:
    """POPE answers from first-token logits, ``ids`` from :func:`answer_ids` of ``pope.ANSWER_WORDS``."""
    return [pope.answer_from_scores(row) for row in answer_scores(logits, ids)]


def sqa_predictions(logits: torch.Tensor, ids: Sequence[Sequence[int]], problems: Sequence[SqaProblem]) -> list[int]:
    """ScienceQA option indices from first-token logits, ``ids`` from :func:`answer_ids` of
    ``scienceqa.ANSWER_WORDS``."""
    rows = answer_scores(logits, ids)
    return [scienceqa.answer_from_scores(row, len(p.choices)) for row, p in zip(rows, problems, strict=True)]


# ------------------------------------------------------------------------------------------------- POPE


@dataclass
class PopeResult:
    metrics: PopeMetrics
    predictions: list[str]
    texts: list[str] = field(default_factory=list)


def evaluate_pope_split(
    model: Any,
    processor: Any,
    questions: Sequence[PopeQuestion],
    mode: str = "logits",
    batch_size: int = 32,
    load_image: Callable[[str], Image.Image] | None = None,
    report: Reporter = SILENT,
) -> PopeResult:
    """POPE metrics for one split. ``load_image`` maps a question's ``image`` to a PIL image."""
    _check_mode(mode)
    load = load_image or ImageCache()
    queries = [Query(load(q.image), pope.prompt_text(q.text)) for q in questions]
    labels = [q.label for q in questions]
    if mode == "logits":
        ids = answer_ids(processor, pope.ANSWER_WORDS, required=True)
        predictions = pope_predictions(next_token_logits(model, processor, queries, batch_size, report), ids)
        return PopeResult(pope.compute_metrics(predictions, labels), predictions)
    texts = generate_answers(model, processor, queries, batch_size, max_new_tokens=8, report=report)
    predictions = [pope.parse_answer(t) for t in texts]
    return PopeResult(pope.compute_metrics(predictions, labels), predictions, texts)


# -------------------------------------------------------------------------------------------- ScienceQA


@dataclass
class SqaResult:
    metrics: SqaMetrics
    predictions: list[int]
    texts: list[str] = field(default_factory=list)


def evaluate_sqa(
    model: Any,
    processor: Any,
    problems: Sequence[SqaProblem],
    mode: str = "logits",
    batch_size: int = 32,
    load_image: Callable[[str], Image.Image] | None = None,
    report: Reporter = SILENT,
) -> SqaResult:
    """ScienceQA accuracy. In logits mode the answer is the highest-scoring letter among the choices."""
    _check_mode(mode)
    load = load_image or ImageCache()
    queries = [Query(load(p.image), scienceqa.prompt_text(p.question, p.choices, p.hint)) for p in problems]
    if mode == "logits":
        logits = next_token_logits(model, processor, queries, batch_size, report)
        predictions = sqa_predictions(logits, answer_ids(processor, scienceqa.ANSWER_WORDS), problems)
        return SqaResult(scienceqa.compute_metrics(predictions, problems), predictions)
    texts = generate_answers(model, processor, queries, batch_size, max_new_tokens=16, report=report)
    predictions = [scienceqa.prediction_index(t, len(p.choices)) for t, p in zip(texts, problems, strict=True)]
    return SqaResult(scienceqa.compute_metrics(predictions, problems), predictions, texts)


# ----------------------------------------------------------------------------------------------- suites


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise OptionError(f"unknown evaluation mode {mode!r}; use one of {', '.join(MODES)}")


def subset(items: Sequence[Any], limit: int | None, seed: int = 0) -> Sequence[Any]:
    """A fixed random subset in the original order (a prefix would see few images and, for files written
    kind by kind, few kinds of question)."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def evaluate(
    model: Any,
    processor: Any,
    pope_dir: str | Path | None = None,
    sqa_dir: str | Path | None = None,
    mode: str = "logits",
    batch_size: int = 32,
    limit: int | None = None,
    pope_splits: Sequence[str] = pope.SPLITS,
    sqa_split: str = "test",
    report: Reporter = SILENT,
) -> dict[str, Any]:
    """Run POPE (every split found) and/or ScienceQA-IMG; returns a JSON-ready dict of metrics.

    ``limit`` caps the questions per POPE split and ScienceQA problems (evenly spaced) for quick checks.
    """
    _check_mode(mode)
    result: dict[str, Any] = {"mode": mode}
    load = ImageCache()
    model.eval()
    if pope_dir is not None:
        result["pope"] = {}
        for split, questions in pope.load_pope(pope_dir, splits=pope_splits).items():
            report.stage(f"pope-{split}", f"{len(subset(questions, limit))} questions")
            res = evaluate_pope_split(model, processor, subset(questions, limit), mode, batch_size, load, report)
            result["pope"][split] = res.metrics.to_dict()
    if sqa_dir is not None:
        problems = subset(scienceqa.load_scienceqa(sqa_dir, sqa_split), limit)
        report.stage("scienceqa", f"{len(problems)} problems")
        sqa_res = evaluate_sqa(model, processor, problems, mode, batch_size, load, report)
        result["scienceqa"] = sqa_res.metrics.to_dict()
    result["intervals"] = intervals(result)
    return result


def intervals(result: dict[str, Any]) -> dict[str, list[float]]:
    """95% bootstrap intervals over questions of the POPE mean balanced accuracy and ScienceQA accuracy."""
    out: dict[str, list[float]] = {}
    if result.get("pope"):
        out["pope_mean_balanced_accuracy"] = list(interval(result, pope_mean))
    if "scienceqa" in result:
        out["scienceqa_accuracy"] = list(interval(result, sqa_accuracy))
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate` result."""
    lines = []
    if "pope" in result:
        header = ("POPE split", "n", "acc", "prec", "rec", "F1", "yes", "bal.acc")
        lines.append(f"{header[0]:<12} {header[1]:>5} " + " ".join(f"{h:>6}" for h in header[2:7]) + f" {header[7]:>8}")
        for split, m in result["pope"].items():
            lines.append(
                f"{split:<12} {m['n']:>5} {m['accuracy']:>6.3f} {m['precision']:>6.3f} {m['recall']:>6.3f} "
                f"{m['f1']:>6.3f} {m['yes_ratio']:>6.3f} {m['balanced_accuracy']:>8.3f}"
            )
    if "scienceqa" in result:
        m = result["scienceqa"]
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in m["by_kind"].items())
        lines.append(f"ScienceQA-IMG  n={m['n']}  accuracy {m['accuracy']:.3f} (+/- {m['accuracy_se']:.3f})  {kinds}")
    for name, (low, high) in result.get("intervals", {}).items():
        lines.append(f"95% interval (bootstrap over questions) of {name.replace('_', ' ')}: [{low:.3f}, {high:.3f}]")
    return "\n".join(lines)
