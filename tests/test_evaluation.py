"""Evaluation plumbing: prompts, batching, logit scoring and generation, with a stub model that sees the image.

The stub answers from the pixels (bright image -> "Yes" / option B, dark -> "No" / option A), so correct
metrics prove the image, the prompt and the answer position line up through padding and batching.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from worker.hipp.errors import OptionError
from worker.hipp.evaluation.runner import (
    answer_ids,
    answer_scores,
    answer_token_ids,
    build_prompt,
    evaluate_pope_split,
    evaluate_sqa,
    format_table,
    intervals,
    pope_predictions,
    sqa_predictions,
    subset,
)
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.pope import PopeQuestion
from worker.hipp.evaluation.tasks.scienceqa import SqaProblem
from worker.hipp.testbed.tokenizer import build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


class PixelOracle(nn.Module):
    """Says "Yes"/"B" for bright images and "No"/"A" for dark ones, at the last position only."""

    def __init__(self, processor: Any, invert: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="llava")
        self.anchor = nn.Parameter(torch.zeros(1))
        tok = processor.tokenizer
        self.vocab = len(tok)
        self.tok = tok
        self.ids = {w: tok.convert_tokens_to_ids(w) for w in ("Yes", "No", "A", "B")}
        self.eos = tok.eos_token_id
        self.invert = invert
        self.seen_last_tokens: list[int] = []

    def _bright(self, pixel_values: torch.Tensor) -> torch.Tensor:
        bright = pixel_values.flatten(1).mean(1) > 0
        return ~bright if self.invert else bright

    def forward(self, input_ids, pixel_values, attention_mask=None, logits_to_keep=0, **kw):  # noqa: ANN001
        self.seen_last_tokens += input_ids[:, -1].tolist()
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        bright = self._bright(pixel_values)
        for row, b in enumerate(bright.tolist()):
            logits[row, -1, self.ids["Yes" if b else "No"]] = 5.0
            logits[row, -1, self.ids["B" if b else "A"]] = 3.0
        return SimpleNamespace(logits=logits[:, -1:] if logits_to_keep == 1 else logits)

    def generate(self, input_ids, pixel_values, max_new_tokens, **kw):  # noqa: ANN001
        bright = self._bright(pixel_values)
        words = [["No", ",", "there", "is", "not", "."], ["Yes"]]
        rows = []
        for b in bright.tolist():
            new = self.tok.convert_tokens_to_ids(words[int(b)])
            rows.append(torch.tensor(new[:max_new_tokens] + [self.eos]))
        width = max(len(r) for r in rows)
        padded = torch.stack([torch.cat([r, torch.full((width - len(r),), self.eos)]) for r in rows])
        return torch.cat([input_ids, padded], dim=1)


def _images(tmp_path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        shade = 230 if i % 2 == 0 else 20
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), (shade, shade, shade)).save(path)
        paths.append(str(path))
    return paths


def test_prompts_follow_llava_evaluation(processor):
    assert pope.prompt_text("Is there a cat in the image?") == (
        "Is there a cat in the image?\nAnswer the question using a single word or phrase.")
    text = scienceqa.prompt_text("How many cups are in the image?", ("1", "2", "3"), hint="Count them.")
    assert text.splitlines() == [
        "Context: Count them.",
        "How many cups are in the image?",
        "A. 1",
        "B. 2",
        "C. 3",
        "Answer with the option's letter from the given choices directly.",
    ]
    prompt = build_prompt(processor, "Is there a cat in the image?")
    assert prompt.startswith("USER: <image>") and prompt.endswith("ASSISTANT:")


def test_fallback_template_when_the_processor_has_none():
    bare = SimpleNamespace(chat_template=None)
    assert build_prompt(bare, "Q?", "llava") == "USER: <image>\nQ? ASSISTANT:"
    assert "<|image_pad|>" in build_prompt(bare, "Q?", "qwen2_vl")


def test_answer_tokens_exist_in_the_testbed_vocabulary(processor):
    tok = processor.tokenizer
    assert answer_token_ids(processor, ("Yes",)) == [tok.convert_tokens_to_ids("Yes")]
    assert tok.unk_token_id not in answer_token_ids(processor, ("Yes", "yes", "No", "no", "A", "E"))


@pytest.mark.parametrize(
    ("scores", "expected"), [((2.0, 1.0), "yes"), ((1.0, 2.0), "no"), ((1.5, 1.5), "no"), ((-math.inf, 0.0), "no")]
)
def test_pope_answer_from_scores_says_yes_only_when_yes_wins(scores, expected):
    assert pope.answer_from_scores(scores) == expected


@pytest.mark.parametrize(
    ("scores", "n_choices", "expected"),
    [
        ((0.1, 0.9, 0.3, 0.0, 0.0), 3, 1),
        ((0.1, 0.2, 0.3, 5.0, 9.0), 3, 2),  # letters past the problem's choices are never picked
        ((0.7, 0.7, 0.1, 0.0, 0.0), 2, 0),  # the first letter on ties
        ((-math.inf, 0.5, 0.0, 0.0, 0.0), 2, 1),  # a letter the tokenizer cannot spell loses
    ],
)
def test_sqa_answer_from_scores_picks_the_best_of_the_choices(scores, n_choices, expected):
    assert scienceqa.answer_from_scores(scores, n_choices) == expected


def test_answer_scores_take_the_best_spelling_per_answer():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [4.0, 0.0, 1.0, 5.0]])
    assert answer_scores(logits, [[1, 2], [3], []]) == [[3.0, 2.0, -math.inf], [1.0, 5.0, -math.inf]]
    assert answer_scores(torch.zeros(0, 0), [[1], [2]]) == []
    assert pope_predictions(logits, [[1, 2], [3]]) == ["yes", "no"]
    problems = [SqaProblem("0", "Q?", ("x", "y"), 0, "", "", ""), SqaProblem("1", "Q?", ("x", "y", "z"), 0, "", "", "")]
    assert sqa_predictions(logits, [[0], [2], [3]], problems) == [1, 2]


def test_pope_from_logits_needs_yes_and_no_tokens(processor):
    assert all(answer_ids(processor, pope.ANSWER_WORDS, required=True))
    with pytest.raises(OptionError, match="no Maybe token"):
        answer_ids(processor, (("Yes",), ("Maybe",)), required=True)
    assert answer_ids(processor, (("Yes",), ("Maybe",)))[1] == []


@pytest.mark.parametrize("mode", ["logits", "generate"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_pope_scoring_reads_the_image(tmp_path, processor, mode, batch_size):
    paths = _images(tmp_path, 10)
    questions = [
        PopeQuestion(i, p, "Is there a cat in the image?", "yes" if i % 2 == 0 else "no", "random")
        for i, p in enumerate(paths)
    ]
    model = PixelOracle(processor)
    res = evaluate_pope_split(model, processor, questions, mode=mode, batch_size=batch_size)
    assert res.metrics.accuracy == 1.0 and res.metrics.yes_ratio == 0.5
    if mode == "logits":
        # Left padding: every row's last token is the end of the generation prompt (":" of "ASSISTANT:").
        assert set(model.seen_last_tokens) == {processor.tokenizer.convert_tokens_to_ids(":")}
    else:
        assert res.texts[1] == "No, there is not."
    wrong = evaluate_pope_split(PixelOracle(processor, invert=True), processor, questions, mode=mode)
    assert wrong.metrics.accuracy == 0.0 and wrong.metrics.balanced_accuracy == 0.0


def test_sqa_logit_scoring_only_considers_the_problem_choices(tmp_path, processor):
    paths = _images(tmp_path, 4)
    problems = [
        SqaProblem("0", "Q?", ("x", "y", "z"), 1, "", paths[0], "count"),  # bright -> B, right
        SqaProblem("1", "Q?", ("x", "y"), 0, "", paths[1], "side"),  # dark -> A, right
        SqaProblem("2", "Q?", ("x", "y"), 0, "", paths[2], "side"),  # bright -> B, wrong
    ]
    res = evaluate_sqa(PixelOracle(processor), processor, problems, mode="logits", batch_size=2)
    assert res.predictions == [1, 0, 1]
    assert res.metrics.correct == 2
    table = format_table({"scienceqa": res.metrics.to_dict()})
    assert "accuracy 0.667" in table
    # Every result carries its per-question outcomes, so intervals can be drawn from it.
    result = {"scienceqa": res.metrics.to_dict()}
    result["intervals"] = intervals(result)
    low, high = result["intervals"]["scienceqa_accuracy"]
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0 and high - low > 0.3  # three problems: a wide interval
    assert "95% interval (bootstrap over questions) of scienceqa accuracy" in format_table(result)


def test_sqa_generation_that_does_not_parse_is_wrong(tmp_path, processor):
    paths = _images(tmp_path, 2)
    problems = [SqaProblem("0", "Q?", ("x", "y"), 0, "", paths[1], "side")]
    # The oracle generates "No, there is not." for a dark image: no letter, so it counts as wrong.
    res = evaluate_sqa(PixelOracle(processor), processor, problems, mode="generate")
    assert res.predictions == [-1] and res.metrics.accuracy == 0.0


def test_unknown_mode_and_missing_image_are_user_errors(tmp_path, processor):
    q = [PopeQuestion(1, str(tmp_path / "missing.png"), "Is there a cat in the image?", "yes", "random")]
    with pytest.raises(OptionError, match="mode"):
        evaluate_pope_split(PixelOracle(processor), processor, q, mode="beam")
    with pytest.raises(OptionError, match="image not found"):
        evaluate_pope_split(PixelOracle(processor), processor, q)


def test_subset_is_fixed_ordered_and_spread():
    items = list(range(300))
    picked = subset(items, 30)
    assert picked == subset(items, 30) and picked == sorted(picked) and len(picked) == 30
    assert {i % 3 for i in picked} == {0, 1, 2}
    assert subset(items, None) is items
