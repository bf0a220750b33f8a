"""POPE and ScienceQA: sampling, writers, loaders for the official layouts, parsers and metrics."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from PIL import Image

from worker.hipp.data.world import CATEGORY_NAMES, generate_scenes
from worker.hipp.errors import HippError
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.pope import ObjectStats
from worker.hipp.testbed.data import write_benchmarks

# --------------------------------------------------------------------------------------------- POPE splits


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(5, 120, "bench", min_categories=3)


@pytest.fixture(scope="module")
def stats(scenes):
    return ObjectStats.from_scenes(scenes)


def _category(text: str) -> str:
    return text.removeprefix("Is there a ").removesuffix(" in the image?")


@pytest.mark.parametrize("split", pope.SPLITS)
def test_pope_split_is_balanced_with_three_of_each_per_image(scenes, split):
    questions = pope.build_split(scenes, split, seed=1)
    assert len(questions) == 6 * len(scenes)
    assert Counter(q.label for q in questions) == {"yes": 3 * len(scenes), "no": 3 * len(scenes)}
    by_id = {s.image_id: s for s in scenes}
    for q in questions:
        present = _category(q.text) in by_id[q.image].categories
        assert present == (q.label == "yes")


def test_popular_negatives_are_the_most_frequent_absent_objects(scenes, stats):
    by_id = {s.image_id: s for s in scenes}
    for q in pope.build_split(scenes, "popular", seed=1):
        if q.label == "no":
            absent = [c for c in CATEGORY_NAMES if c not in by_id[q.image].categories]
            top3 = sorted(stats.frequency[c] for c in absent)[-3:]
            assert stats.frequency[_category(q.text)] >= top3[0]


def test_adversarial_negatives_are_the_most_co_occurring_absent_objects(scenes, stats):
    by_id = {s.image_id: s for s in scenes}

    def score(image: str, c: str) -> int:
        return sum(stats.cooccurrence.get(p, Counter())[c] for p in by_id[image].categories)

    for q in pope.build_split(scenes, "adversarial", seed=1):
        if q.label == "no":
            absent = [c for c in CATEGORY_NAMES if c not in by_id[q.image].categories]
            third_best = sorted((score(q.image, c) for c in absent), reverse=True)[2]
            assert score(q.image, _category(q.text)) >= third_best


def test_hard_negatives_are_more_frequent_than_random_ones(scenes, stats):
    def mean_freq(split: str) -> float:
        negs = [_category(q.text) for q in pope.build_split(scenes, split, seed=1) if q.label == "no"]
        return sum(stats.frequency[c] for c in negs) / len(negs)

    assert mean_freq("popular") > 1.5 * mean_freq("random")
    assert mean_freq("adversarial") > mean_freq("random")


# ------------------------------------------------------------------------------------ writers and loaders


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed-data")
    counts = write_benchmarks(out, seed=9, pope_images=20, sqa_sizes={"train": 9, "val": 6, "test": 30})
    return out, counts


def test_written_pope_reads_back_through_the_loader(written):
    out, counts = written
    assert counts["pope"] == {"random": 120, "popular": 120, "adversarial": 120}
    data = pope.load_pope(out / "pope")
    assert set(data) == set(pope.SPLITS)
    for split, questions in data.items():
        assert len(questions) == counts["pope"][split]
        assert all(q.split == split for q in questions)
        assert Image.open(questions[0].image).size == (64, 64)


def test_written_scienceqa_reads_back_through_the_loader(written):
    out, counts = written
    assert counts["scienceqa"] == {"train": 9, "val": 6, "test": 30}
    problems = scienceqa.load_scienceqa(out / "scienceqa", "test")
    assert len(problems) == 30
    assert Counter(p.kind for p in problems) == {"presence": 10, "count": 10, "side": 10}
    for p in problems:
        assert 0 <= p.answer < len(p.choices) <= 5
        assert Image.open(p.image).size == (64, 64)
    raw = json.loads((out / "scienceqa" / "pid_splits.json").read_text())
    assert not set(raw["train"]) & set(raw["test"])


def test_official_coco_pope_layout(tmp_path):
    (tmp_path / "val2014").mkdir()
    rows = [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
         "label": "no"},
    ]
    (tmp_path / "coco_pope_adversarial.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = pope.load_pope(tmp_path)
    assert list(data) == ["adversarial"]
    q = data["adversarial"][0]
    assert q.image == str(tmp_path / "val2014" / "COCO_val2014_000000310196.jpg")
    assert (q.label, data["adversarial"][1].label) == ("yes", "no")


def test_llava_pope_jsonl_takes_labels_from_coco_pope_files(tmp_path):
    questions = [
        {"question_id": 10, "image": "a.jpg", "text": "Is there a cat in the image?", "category": "random"},
        {"question_id": 11, "image": "a.jpg", "text": "Is there a car in the image?", "category": "random"},
        {"question_id": 12, "image": "a.jpg", "text": "Is there a cup in the image?", "category": "popular"},
    ]
    (tmp_path / "llava_pope_test.jsonl").write_text("\n".join(json.dumps(r) for r in questions))
    labels = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a car in the image?", "label": "no"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"},
    ]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(json.dumps(r) for r in labels))
    data = pope.load_pope(tmp_path / "llava_pope_test.jsonl", images=tmp_path / "imgs", splits=("random",))
    assert [(q.question_id, q.label) for q in data["random"]] == [(10, "yes"), (11, "no")]
    assert data["random"][0].image == str(tmp_path / "imgs" / "a.jpg")
    with pytest.raises(HippError, match="no labels"):
        pope.load_pope(tmp_path / "llava_pope_test.jsonl", splits=("popular",))


def test_loaders_report_missing_data(tmp_path):
    with pytest.raises(HippError):
        pope.load_pope(tmp_path / "nope")
    with pytest.raises(HippError, match="no POPE files"):
        pope.load_pope(tmp_path)
    with pytest.raises(HippError, match="problems.json"):
        scienceqa.load_scienceqa(tmp_path)


def test_scienceqa_loader_keeps_only_image_problems(tmp_path):
    problems = {
        "1": {"question": "Which is hot?", "choices": ["sun", "ice"], "answer": 0, "hint": "", "image": None},
        "2": {"question": "Which animal?", "choices": ["cat", "dog", "cow"], "answer": 2, "hint": "Look.",
              "image": "image.png"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "train": []}))
    loaded = scienceqa.load_scienceqa(tmp_path, "test")
    assert [p.pid for p in loaded] == ["2"]
    assert loaded[0].image == str(tmp_path / "images" / "test" / "2" / "image.png")
    assert loaded[0].hint == "Look."
    assert len(scienceqa.load_scienceqa(tmp_path, "test", image_only=False)) == 2


# ------------------------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("Yes, there is a dog in the image.", "yes"),
        ("There is not a dog.", "no"),
        ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
        ("no", "no"),
        ("Nope", "yes"),  # not one of the parser's words
        ("", "yes"),
    ],
)
def test_pope_parser_follows_the_official_rule(text, expected):
    assert pope.parse_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("B", 4, 1),
        ("The answer is B.", 4, 1),
        ("C. 3", 3, 2),
        ("A.", 3, 0),
        ("E", 3, -1),  # a letter with no such option
        ("I think it is B", 4, -1),
        ("The answer is A. The answer is B.", 4, -1),  # ambiguous
        ("", 4, -1),
        ("banana", 4, -1),
    ],
)
def test_scienceqa_parser_edge_cases(text, n, expected):
    assert scienceqa.prediction_index(text, n) == expected


# ------------------------------------------------------------------------------------------------ metrics


def test_pope_metrics_on_a_hand_made_confusion_matrix():
    # tp=40, fn=10, fp=5, tn=45
    labels = ["yes"] * 50 + ["no"] * 50
    preds = ["yes"] * 40 + ["no"] * 10 + ["yes"] * 5 + ["no"] * 45
    m = pope.compute_metrics(preds, labels)
    assert (m.tp, m.fn, m.fp, m.tn) == (40, 10, 5, 45)
    assert m.accuracy == pytest.approx(0.85)
    assert m.precision == pytest.approx(40 / 45)
    assert m.recall == pytest.approx(0.8)
    assert m.f1 == pytest.approx(2 * (40 / 45) * 0.8 / (40 / 45 + 0.8))
    assert m.yes_ratio == pytest.approx(0.45)
    assert m.balanced_accuracy == pytest.approx((0.8 + 0.9) / 2)
    assert m.balanced_accuracy_se == pytest.approx(math.sqrt(0.8 * 0.2 / 50 + 0.9 * 0.1 / 50) / 2)


def test_pope_metrics_always_yes_and_unbalanced_labels():
    m = pope.compute_metrics(["yes"] * 10, ["yes"] * 8 + ["no"] * 2)
    assert m.accuracy == pytest.approx(0.8)
    assert m.balanced_accuracy == pytest.approx(0.5)
    assert m.yes_ratio == 1.0
    empty = pope.compute_metrics([], [])
    assert (empty.accuracy, empty.f1, empty.precision) == (0.0, 0.0, 0.0)


def test_scienceqa_accuracy_counts_unparseable_as_wrong():
    problems = [
        scienceqa.SqaProblem(str(i), "q", ("a", "b", "c"), i % 3, "", "", kind)
        for i, kind in enumerate(["count", "count", "side", "side"])
    ]
    m = scienceqa.compute_metrics([0, -1, 2, 1], problems)
    assert m.correct == 2 and m.n == 4
    assert m.accuracy == 0.5
    assert m.to_dict()["by_kind"] == {"count": 0.5, "side": 0.5}
