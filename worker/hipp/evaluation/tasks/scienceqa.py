"""ScienceQA: the testbed's image questions, writer, loader, the prompt, answer parsing (from first-token scores
or with the official letter parser) and accuracy.

Layout (the official one): ``problems.json`` maps a problem id to {question, choices, answer (index), hint,
image, split, ...}; ``pid_splits.json`` maps train/val/test to id lists; images live in
``images/{split}/{pid}/image.png``. The loader keeps only problems with an image (ScienceQA-IMG).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.hipp.data.world import BY_NAME, CATEGORY_NAMES, IMAGE_SIZE, Scene, render, sample_scene
from worker.hipp.errors import HippError
from worker.hipp.evaluation.bits import pack_bits
from worker.hipp.evaluation.tasks.pope import ObjectStats

OPTIONS = ("A", "B", "C", "D", "E")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
# The answers scored in logits mode: each option letter by its first token.
ANSWER_WORDS: tuple[tuple[str, ...], ...] = tuple((letter,) for letter in OPTIONS)
KINDS = ("presence", "count", "side")
# Objects this close to the vertical midline make "left or right" ambiguous; side questions avoid them.
SIDE_MARGIN = 8


@dataclass(frozen=True)
class SqaProblem:
    """One multiple-choice problem. ``answer`` indexes ``choices``; ``image`` is a path or a scene id."""

    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str
    image: str
    kind: str = ""


def _presence_problem(scene: Scene, rng: random.Random, stats: ObjectStats | None) -> tuple[str, list[str], int]:
    present = scene.categories
    answer = rng.choice(present)
    absent = [c for c in CATEGORY_NAMES if c not in present]
    # Mix distractors: one that usually co-occurs with the scene's objects, the rest at random.
    distractors: list[str] = []
    if stats is not None:
        distractors.append(stats.most_cooccurring_absent(present, CATEGORY_NAMES)[rng.randrange(3)])
    while len(distractors) < 3:
        pick = rng.choice(absent)
        if pick not in distractors:
            distractors.append(pick)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return "Which of these objects is in the image?", choices, choices.index(answer)


def _count_problem(scene: Scene, rng: random.Random) -> tuple[str, list[str], int]:
    target = scene.objects[0].category  # sample_scene(forced_count=...) puts the counted category first
    count = scene.count(target)
    return f"How many {BY_NAME[target].plural} are in the image?", ["1", "2", "3"], count - 1


def side_candidates(scene: Scene) -> list[str]:
    """Categories that appear once and clearly to one side of the image."""
    mid = IMAGE_SIZE / 2
    return [
        c
        for c in scene.categories
        if scene.count(c) == 1
        and abs(next(o for o in scene.objects if o.category == c).centre_x - mid) >= SIDE_MARGIN
    ]


def _side_problem(scene: Scene, rng: random.Random) -> tuple[str, list[str], int]:
    target = rng.choice(side_candidates(scene))
    obj = next(o for o in scene.objects if o.category == target)
    side = "left" if obj.centre_x < IMAGE_SIZE / 2 else "right"
    choices = ["left", "right"]
    rng.shuffle(choices)
    return f"Is the {target} on the left or the right of the image?", choices, choices.index(side)


def sample_problem(
    rng: random.Random, pid: str, kind: str, stats: ObjectStats | None = None
) -> tuple[Scene, SqaProblem]:
    """Draw a scene suited to ``kind`` and a problem about it."""
    if kind == "count":
        scene = sample_scene(rng, pid, forced_count=rng.choice([1, 2, 3]))
        question, choices, answer = _count_problem(scene, rng)
    elif kind == "side":
        scene = sample_scene(rng, pid)
        while not side_candidates(scene):
            scene = sample_scene(rng, pid)
        question, choices, answer = _side_problem(scene, rng)
    elif kind == "presence":
        scene = sample_scene(rng, pid)
        question, choices, answer = _presence_problem(scene, rng, stats)
    else:
        raise HippError(f"unknown ScienceQA problem kind {kind!r}")
    return scene, SqaProblem(pid, question, tuple(choices), answer, "", pid, kind)


def generate_problems(
    seed: int, n: int, prefix: str, stats: ObjectStats | None = None
) -> list[tuple[Scene, SqaProblem]]:
    """``n`` problems with the kinds in equal shares, deterministic in (seed, prefix)."""
    rng = random.Random(f"{seed}:sqa:{prefix}")
    return [sample_problem(rng, f"{prefix}{i:06d}", KINDS[i % len(KINDS)], stats) for i in range(n)]


def write_scienceqa(splits: dict[str, list[tuple[Scene, SqaProblem]]], out: Path) -> dict[str, int]:
    """Write problems.json, pid_splits.json and images/{split}/{pid}/image.png."""
    problems: dict[str, dict[str, object]] = {}
    pid_splits: dict[str, list[str]] = {}
    for split, items in splits.items():
        pid_splits[split] = []
        for scene, problem in items:
            folder = out / "images" / split / problem.pid
            folder.mkdir(parents=True, exist_ok=True)
            render(scene).save(folder / "image.png")
            pid_splits[split].append(problem.pid)
            problems[problem.pid] = {
                "question": problem.question,
                "choices": list(problem.choices),
                "answer": problem.answer,
                "hint": problem.hint,
                "image": "image.png",
                "task": "closed choice",
                "choice": "",
                "grade": "grade1",
                "subject": "natural science",
                "topic": "testbed",
                "category": problem.kind,
                "skill": problem.kind,
                "lecture": "",
                "solution": "",
                "split": split,
            }
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.json").write_text(json.dumps(problems))
    (out / "pid_splits.json").write_text(json.dumps(pid_splits))
    return {split: len(ids) for split, ids in pid_splits.items()}


def load_scienceqa(
    path: str | Path, split: str = "test", images: str | Path | None = None, image_only: bool = True
) -> list[SqaProblem]:
    """Read ScienceQA's problems.json + pid_splits.json; by default the problems of ``split`` with an image."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    problems_file, splits_file = root / "problems.json", root / "pid_splits.json"
    if not problems_file.exists() or not splits_file.exists():
        raise HippError(f"ScienceQA data not found in {root}: expected problems.json and pid_splits.json")
    problems = json.loads(problems_file.read_text())
    pid_splits = json.loads(splits_file.read_text())
    if split not in pid_splits:
        raise HippError(f"ScienceQA split {split!r} not in pid_splits.json (has {', '.join(pid_splits)})")
    image_root = Path(images) if images else root / "images"
    out: list[SqaProblem] = []
    for pid in pid_splits[split]:
        p = problems[str(pid)]
        if image_only and not p.get("image"):
            continue
        image = str(image_root / split / str(pid) / p["image"]) if p.get("image") else ""
        out.append(
            SqaProblem(
                str(pid),
                str(p["question"]),
                tuple(str(c) for c in p["choices"]),
                int(p["answer"]),
                str(p.get("hint") or ""),
                image,
                str(p.get("skill") or p.get("category") or ""),
            )
        )
    return out


# ------------------------------------------------------------------------------ prompt, parsing, metrics


def prompt_text(question: str, choices: Sequence[str], hint: str = "") -> str:
    """LLaVA-1.5's ScienceQA prompt: context (if any), question, lettered options, the letter instruction."""
    lines = [f"Context: {hint}"] if hint else []
    lines.append(question)
    lines.extend(f"{OPTIONS[i]}. {c}" for i, c in enumerate(choices))
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def answer_from_scores(scores: Sequence[float], n_choices: int) -> int:
    """Logits mode: the index of the best-scoring letter among the problem's ``n_choices`` options (``scores``
    in ``ANSWER_WORDS`` order; the first on ties)."""
    considered = scores[:n_choices]
    return max(range(len(considered)), key=considered.__getitem__)


_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str | None:
    """LLaVA's ScienceQA parser: a bare letter, "X. ..." (or just "X."), or exactly one "The answer is X."."""
    text = text.strip()
    if text in OPTIONS:
        return text
    if len(text) >= 2 and text[0] in OPTIONS and (text[1:3] == ". " or text[1:] == "."):
        return text[0]
    found = _ANSWER_IS.findall(text + " ")
    if len(found) == 1:
        return str(found[0])
    return None


def prediction_index(text: str, n_choices: int) -> int:
    """Index of the chosen option, or -1 when the text cannot be parsed or names a missing option."""
    letter = parse_letter(text)
    if letter is None or letter not in OPTIONS[:n_choices]:
        return -1
    return OPTIONS.index(letter)


@dataclass(frozen=True)
class SqaMetrics:
    """Accuracy overall and per problem kind (skill)."""

    correct: int
    n: int
    by_kind: dict[str, tuple[int, int]]
    #: Per problem, packed (``evaluation.intervals``): answered correctly.
    correct_bits: str = ""

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def accuracy_se(self) -> float:
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.n) if self.n else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_se": self.accuracy_se,
            "by_kind": {k: c / t if t else 0.0 for k, (c, t) in sorted(self.by_kind.items())},
            **({"per_question": {"correct": self.correct_bits}} if self.correct_bits else {}),
        }


def compute_metrics(predicted: Sequence[int], problems: Sequence[SqaProblem]) -> SqaMetrics:
    """Accuracy from predicted option indices (-1 = unparseable, counted wrong)."""
    if len(predicted) != len(problems):
        raise ValueError("predictions and problems differ in length")
    by_kind: dict[str, tuple[int, int]] = {}
    hits = [pred == problem.answer for pred, problem in zip(predicted, problems, strict=True)]
    for hit, problem in zip(hits, problems, strict=True):
        c, t = by_kind.get(problem.kind, (0, 0))
        by_kind[problem.kind] = (c + int(hit), t + 1)
    return SqaMetrics(sum(hits), len(problems), by_kind, pack_bits(hits))
