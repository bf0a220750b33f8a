"""POPE: question sampling (random / popular / adversarial), writer, loaders, the prompt, answer parsing (from
first-token scores or from generated text) and metrics.

The writer produces the official layout (one JSON object per line: question_id, image, text, label, plus an
images folder). The loader reads that layout, the official ``coco_pope_{split}.json`` files with a COCO image
folder, and LLaVA's ``llava_pope_test.jsonl`` (labels taken from the coco_pope files next to it).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.hipp.data.world import CATEGORY_NAMES, Scene, render
from worker.hipp.errors import HippError
from worker.hipp.evaluation.bits import pack_bits

SPLITS = ("random", "popular", "adversarial")
QUESTIONS_PER_LABEL = 3  # POPE asks about 3 present and 3 absent objects per image
INSTRUCTION = "Answer the question using a single word or phrase."
# The answers scored in logits mode, "yes" then "no", each by the first tokens of its spellings.
ANSWER_WORDS: tuple[tuple[str, ...], ...] = (("Yes", "yes"), ("No", "no"))


def question_text(category: str) -> str:
    """POPE's question wording (it always says "a", even before a vowel)."""
    return f"Is there a {category} in the image?"


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question. ``image`` is a path (or, for generated data in memory, a scene id)."""

    question_id: int
    image: str
    text: str
    label: str
    split: str


@dataclass
class ObjectStats:
    """Object frequency and pairwise co-occurrence over a set of images: what POPE's splits sample from."""

    frequency: Counter[str]
    cooccurrence: dict[str, Counter[str]]

    @classmethod
    def from_scenes(cls, scenes: Iterable[Scene]) -> ObjectStats:
        return cls.from_annotations(s.categories for s in scenes)

    @classmethod
    def from_annotations(cls, images: Iterable[Sequence[str]]) -> ObjectStats:
        frequency: Counter[str] = Counter()
        cooccurrence: dict[str, Counter[str]] = {}
        for objects in images:
            present = set(objects)
            frequency.update(present)
            for a in present:
                cooccurrence.setdefault(a, Counter()).update(present - {a})
        return cls(frequency, cooccurrence)

    def most_frequent_absent(self, present: Sequence[str], universe: Sequence[str]) -> list[str]:
        """Absent categories, most frequent first (ties broken by name so the order is deterministic)."""
        absent = [c for c in universe if c not in present]
        return sorted(absent, key=lambda c: (-self.frequency[c], c))

    def most_cooccurring_absent(self, present: Sequence[str], universe: Sequence[str]) -> list[str]:
        """Absent categories ordered by how often they appear together with the present ones."""
        absent = [c for c in universe if c not in present]

        def score(c: str) -> int:
            return sum(self.cooccurrence.get(p, Counter())[c] for p in present)

        return sorted(absent, key=lambda c: (-score(c), -self.frequency[c], c))


def negatives_for(
    split: str,
    present: Sequence[str],
    k: int,
    stats: ObjectStats,
    rng: random.Random,
    universe: Sequence[str] = CATEGORY_NAMES,
) -> list[str]:
    """The ``k`` absent objects POPE asks about for an image in ``split``."""
    if split == "random":
        return rng.sample([c for c in universe if c not in present], k)
    if split == "popular":
        return stats.most_frequent_absent(present, universe)[:k]
    if split == "adversarial":
        return stats.most_cooccurring_absent(present, universe)[:k]
    raise HippError(f"unknown POPE split {split!r}; expected one of {', '.join(SPLITS)}")


def build_split(
    scenes: Sequence[Scene], split: str, seed: int, stats: ObjectStats | None = None
) -> list[PopeQuestion]:
    """POPE questions for ``split``: per image up to 3 present objects (yes) and as many absent ones (no)."""
    stats = stats or ObjectStats.from_scenes(scenes)
    rng = random.Random(f"{seed}:pope:{split}")
    questions: list[PopeQuestion] = []
    for scene in scenes:
        present = scene.categories
        positives = rng.sample(present, min(QUESTIONS_PER_LABEL, len(present)))
        negatives = negatives_for(split, present, len(positives), stats, rng)
        pairs = [(c, "yes") for c in positives] + [(c, "no") for c in negatives]
        rng.shuffle(pairs)
        for category, label in pairs:
            qid = len(questions) + 1
            questions.append(PopeQuestion(qid, scene.image_id, question_text(category), label, split))
    return questions


def write_pope(scenes: Sequence[Scene], out: Path, seed: int, prefix: str = "testbed") -> dict[str, int]:
    """Write ``{prefix}_pope_{split}.json`` for each split and ``images/``; returns questions per split."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        render(scene).save(images / f"{scene.image_id}.png")
    stats = ObjectStats.from_scenes(scenes)
    counts: dict[str, int] = {}
    for split in SPLITS:
        questions = build_split(scenes, split, seed, stats)
        with open(out / f"{prefix}_pope_{split}.json", "w") as f:
            for q in questions:
                row = {"question_id": q.question_id, "image": f"{q.image}.png", "text": q.text, "label": q.label}
                f.write(json.dumps(row) + "\n")
        counts[split] = len(questions)
    with open(out / "annotations.json", "w") as f:
        json.dump([s.to_json() for s in scenes], f)
    return counts


# ---------------------------------------------------------------------------------------------- loading


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _find_image_dir(root: Path, images: Path | None) -> Path:
    if images is not None:
        return images
    for name in ("images", "val2014", "coco/val2014"):
        if (root / name).is_dir():
            return root / name
    return root


def _split_files(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in SPLITS:
        matches = sorted(root.glob(f"*pope_{split}.json"))
        if matches:
            found[split] = matches[0]
    return found


def _labels_by_question(rows: list[dict[str, object]]) -> dict[tuple[str, str], str]:
    return {(str(r["image"]), str(r["text"])): str(r["label"]).strip().lower() for r in rows}


def _load_llava_jsonl(path: Path, image_dir: Path, splits: Sequence[str]) -> dict[str, list[PopeQuestion]]:
    """LLaVA's single file: rows carry a ``category`` (the split); labels come from coco_pope_*.json."""
    rows = _read_jsonl(path)
    label_files = _split_files(path.parent)
    out: dict[str, list[PopeQuestion]] = {}
    for split in splits:
        split_rows = [r for r in rows if r.get("category") == split]
        if not split_rows:
            continue
        if "label" in split_rows[0]:
            labels = [str(r["label"]).strip().lower() for r in split_rows]
        elif split in label_files:
            label_rows = _read_jsonl(label_files[split])
            by_question = _labels_by_question(label_rows)
            labels = [by_question.get((str(r["image"]), str(r["text"])), "") for r in split_rows]
            if any(not label for label in labels):
                # LLaVA's own evaluation pairs questions and labels by order; do the same when text differs.
                if len(label_rows) != len(split_rows):
                    raise HippError(f"{label_files[split]} does not match the {split} questions in {path}")
                labels = [str(r["label"]).strip().lower() for r in label_rows]
        else:
            raise HippError(f"no labels for POPE split {split!r}: put coco_pope_{split}.json next to {path}")
        out[split] = [
            PopeQuestion(int(str(r["question_id"])), str(image_dir / str(r["image"])), str(r["text"]), lab, split)
            for r, lab in zip(split_rows, labels, strict=True)
        ]
    return out


def load_pope(
    path: str | Path, images: str | Path | None = None, splits: Sequence[str] = SPLITS
) -> dict[str, list[PopeQuestion]]:
    """Read POPE from a folder (``*pope_{split}.json`` files) or LLaVA's ``llava_pope_test.jsonl``.

    ``images`` is the image folder; by default ``images/``, ``val2014/`` or the folder itself.
    """
    root = Path(path)
    if not root.exists():
        raise HippError(f"POPE data not found: {root}")
    image_dir = _find_image_dir(root if root.is_dir() else root.parent, Path(images) if images else None)
    for split in splits:
        if split not in SPLITS:
            raise HippError(f"unknown POPE split {split!r}; expected one of {', '.join(SPLITS)}")
    if root.is_file() and root.suffix == ".jsonl":
        out = _load_llava_jsonl(root, image_dir, splits)
    elif root.is_dir() and (root / "llava_pope_test.jsonl").exists() and not _split_files(root):
        out = _load_llava_jsonl(root / "llava_pope_test.jsonl", image_dir, splits)
    else:
        files = _split_files(root) if root.is_dir() else {s: root for s in splits if s in root.name}
        out = {}
        for split in splits:
            if split not in files:
                continue
            out[split] = [
                PopeQuestion(
                    int(str(r["question_id"])),
                    str(image_dir / str(r["image"])),
                    str(r["text"]),
                    str(r["label"]).strip().lower(),
                    split,
                )
                for r in _read_jsonl(files[split])
            ]
    if not out:
        raise HippError(f"no POPE files in {root} (expected *pope_random.json etc. or llava_pope_test.jsonl)")
    for split, questions in out.items():
        bad = {q.label for q in questions} - {"yes", "no"}
        if bad:
            raise HippError(f"POPE {split}: labels must be yes/no, found {sorted(bad)}")
    return out


# ------------------------------------------------------------------------------ prompt, parsing, metrics


def prompt_text(question: str) -> str:
    """LLaVA-1.5's POPE prompt: the question, then the short-answer instruction."""
    return f"{question}\n{INSTRUCTION}"


def answer_from_scores(scores: Sequence[float]) -> str:
    """Logits mode: "yes" when the best "Yes" token outscores the best "No" token (``scores`` in
    ``ANSWER_WORDS`` order; a tie says no)."""
    yes, no = scores
    return "yes" if yes > no else "no"


def parse_answer(text: str) -> str:
    """The official POPE parser: first sentence, commas removed; "No"/"not"/"no" as a word means no."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


@dataclass(frozen=True)
class PopeMetrics:
    """POPE metrics with "yes" as the positive class."""

    tp: int
    fp: int
    tn: int
    fn: int
    #: Per question, packed (``evaluation.intervals``): the label is "yes" / the answer is "yes".
    label_bits: str = ""
    yes_bits: str = ""

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def yes_ratio(self) -> float:
        return (self.tp + self.fp) / self.n if self.n else 0.0

    @property
    def balanced_accuracy(self) -> float:
        return (self.recall + self.specificity) / 2

    @property
    def balanced_accuracy_se(self) -> float:
        """Standard error of balanced accuracy (binomial on each class, averaged)."""
        pos, neg = self.tp + self.fn, self.tn + self.fp
        var = 0.0
        if pos:
            var += self.recall * (1 - self.recall) / pos
        if neg:
            var += self.specificity * (1 - self.specificity) / neg
        return math.sqrt(var) / 2

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "yes_ratio": self.yes_ratio,
            "balanced_accuracy": self.balanced_accuracy,
            "balanced_accuracy_se": self.balanced_accuracy_se,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            **({"per_question": {"label": self.label_bits, "yes": self.yes_bits}} if self.label_bits else {}),
        }


def compute_metrics(predictions: Sequence[str], labels: Sequence[str]) -> PopeMetrics:
    """Confusion counts from parsed predictions ("yes"/"no") and labels ("yes"/"no")."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        if label == "yes":
            tp, fn = (tp + 1, fn) if pred == "yes" else (tp, fn + 1)
        else:
            fp, tn = (fp + 1, tn) if pred == "yes" else (fp, tn + 1)
    return PopeMetrics(tp, fp, tn, fn, pack_bits([label == "yes" for label in labels]),
                       pack_bits([pred == "yes" for pred in predictions]))
