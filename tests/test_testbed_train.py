"""The testbed's training recipe: token layout of the auxiliary targets, kind weighting, and a tiny full run."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from worker.hipp.data.world import generate_scenes
from worker.hipp.evaluation.tasks import scienceqa
from worker.hipp.evaluation.tasks.pope import ObjectStats
from worker.hipp.evaluation.tasks.scienceqa import OPTIONS
from worker.hipp.progress import SILENT
from worker.hipp.testbed.tokenizer import build_processor
from worker.hipp.testbed.train import (
    Encoder,
    SqaSampler,
    TrainConfig,
    _stage2_batch,
    build_pool,
    sqa_turn,
    train,
)


@pytest.fixture(scope="module")
def enc() -> Encoder:
    return Encoder(build_processor().tokenizer)


@pytest.fixture(scope="module")
def world():
    scenes = generate_scenes(0, 48, "unit")
    problems = scienceqa.generate_problems(0, 48, "unit", ObjectStats.from_scenes(scenes))
    pool = build_pool(scenes + [s for s, _ in problems], [None] * len(scenes) + [p for _, p in problems], SILENT)
    return pool, ObjectStats.from_scenes(scenes), problems


def test_option_ends_point_at_each_options_last_word_after_its_letter(enc, world):
    _, _, problems = world
    for _, problem in problems[:9]:
        ids, _, offsets = enc.encode_with_offsets([sqa_turn(problem)])
        tokens = enc.tok.convert_ids_to_tokens(ids)
        for k, end in enumerate(enc.option_ends(problem)):
            assert tokens[offsets[0] + end] == problem.choices[k].split()[-1]
            assert tokens[offsets[0] + end - 2 : offsets[0] + end] == [OPTIONS[k], "."]


def test_stage2_batch_marks_exactly_the_answer_option_of_each_problem(enc, world):
    pool, stats, _ = world
    cfg = TrainConfig(batch=32, sqa_share=0.6)
    batch, rows, marks = _stage2_batch(
        pool, cfg, random.Random(3), stats, enc, False, SqaSampler(pool, cfg.sqa_kind_weights)
    )
    assert marks.shape[1] == 3 and len(marks) > 0
    per_row = Counter(marks[marks[:, 2] == 1][:, 0].tolist())
    sqa_rows = {b for b in marks[:, 0].tolist()}
    assert set(per_row) == sqa_rows and set(per_row.values()) == {1}
    for b, position, correct in marks.tolist():
        problem = pool.problems[rows[b].item()]
        assert problem is not None
        word = enc.tok.convert_ids_to_tokens([batch["input_ids"][b, position].item()])[0]
        chosen = [c.split()[-1] for c in problem.choices]
        assert word in chosen
        assert (word == chosen[problem.answer]) == bool(correct)


def test_multiturn_batches_mark_the_problem_wherever_its_turn_lands(enc, world):
    pool, stats, _ = world
    cfg = TrainConfig(batch=16, turns=3)
    batch, rows, marks = _stage2_batch(
        pool, cfg, random.Random(5), stats, enc, True, SqaSampler(pool, cfg.sqa_kind_weights)
    )
    assert sorted(set(marks[marks[:, 2] == 1][:, 0].tolist())) == list(range(16))
    for b, position, _ in marks.tolist():
        problem = pool.problems[rows[b].item()]
        assert problem is not None
        word = enc.tok.convert_ids_to_tokens([batch["input_ids"][b, position].item()])[0]
        assert word in [c.split()[-1] for c in problem.choices]


def test_sqa_sampler_follows_the_kind_weights(world):
    pool, _, _ = world
    sampler = SqaSampler(pool, {"presence": 1.0, "count": 3.0, "side": 0.0})
    rng = random.Random(0)
    kinds = Counter(pool.problems[sampler.draw(rng)].kind for _ in range(2000))  # type: ignore[union-attr]
    assert kinds["side"] == 0
    assert 2.5 < kinds["count"] / kinds["presence"] < 3.5


def test_a_tiny_run_trains_both_stages_and_exports_a_loadable_model(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = TrainConfig(
        pope_images=64, sqa_problems=48, stage1_steps=4, stage2_steps=6, warmup=2, batch=8, eval_every=1000,
        val_images=12, val_problems=12, threads=1,
    )
    summary = train(cfg, tmp_path / "model", tmp_path / "work")
    log = [json.loads(line) for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    stage2 = [r for r in log if r.get("stage") == 2 and "qa_loss" in r]
    assert stage2 and all(torch.isfinite(torch.tensor(r["option"])) for r in stage2)
    assert summary["stage1_steps"] == 4 and summary["val"]["steps"] == 6  # type: ignore[index]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    assert model.config.text_config.num_attention_heads == 8 and processor.tokenizer is not None
