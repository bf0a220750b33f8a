"""Per-layer fragility: the single-layer plans it builds, its paired estimates, and ``hipp inspect --fragility``."""

from __future__ import annotations

import json
import math

import pytest

from worker.cli import main
from worker.hipp.data.calibration import synthetic_samples
from worker.hipp.evaluation.fragility import (
    PERTURBATIONS,
    Answers,
    Term,
    fragility,
    linear_estimate,
    paired_drops,
    perturbation_plan,
    summarize,
)
from worker.hipp.evaluation.plan_evaluator import EvalSet, PlanEvaluator
from worker.hipp.models.loading import load_model
from worker.hipp.pruning.plan import LayerPlan, PruningPlan, geometry_of
from worker.hipp.pruning.planner import build_plan, score_model
from worker.hipp.testbed.data import write_benchmarks


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_benchmarks(root, seed=5, pope_images=8, sqa_sizes={"train": 4, "val": 12, "test": 4})
    return EvalSet.from_dirs(root / "pope", root / "scienceqa", sqa_split="val", limit=6)


@pytest.fixture(scope="module")
def result(tiny, evalset):
    return fragility(tiny, evalset, synthetic_samples(4, seed=1))


def changed_layers(plan: PruningPlan) -> list[int]:
    return [i for i, (s, lp) in enumerate(zip(plan.geometry.layers, plan.layers, strict=True))
            if lp != LayerPlan.dense(s)]


def test_one_row_per_layer_and_perturbation(tiny, result):
    layers = geometry_of(tiny.adapter).num_layers
    assert [(r.layer, r.perturbation) for r in result.rows] == [(i, p) for i in range(layers) for p in PERTURBATIONS]
    for row in result.rows:
        assert set(row.drops) == {"pope_bacc_drop", "pope_yes_shift", "sqa_drop"}
        assert set(row.metrics) == {"pope_bacc", "pope_yes", "sqa"}
        assert all(e.se >= 0 and e.low <= e.value <= e.high for e in (*row.drops.values(), *row.metrics.values()))
    table = result.to_dict()
    assert table["criterion"] == "wanda-sp" and len(table["rows"]) == 2 * layers
    assert table["rows"][0]["pope_bacc_drop"].keys() == {"value", "se", "low", "high"}


def test_head_plan_removes_the_weakest_query_head_of_every_kv_group_in_one_layer(tiny):
    scores = score_model(tiny, "wanda-sp", synthetic_samples(4, seed=1)).scores
    for layer, shape in enumerate(geometry_of(tiny.adapter).layers):
        plan = perturbation_plan(tiny, scores, layer, "heads")
        assert changed_layers(plan) == [layer]
        kept = plan.layers[layer]
        assert kept.kv_heads == tuple(range(shape.num_kv_heads))
        assert kept.channels == tuple(range(shape.intermediate_size))
        removed = sorted(set(range(shape.num_heads)) - set(kept.heads))
        assert [h // shape.group_size for h in removed] == list(range(shape.num_kv_heads)), "one per group"
        for h in removed:
            group = range(h // shape.group_size * shape.group_size, (h // shape.group_size + 1) * shape.group_size)
            assert scores[layer].heads[h] == min(scores[layer].heads[g] for g in group)
        assert plan.meta["criterion"] == "wanda-sp"


def test_mlp_plan_removes_the_weakest_quarter_of_channels_in_one_layer(tiny):
    scores = score_model(tiny, "wanda-sp", synthetic_samples(4, seed=1)).scores
    for layer, shape in enumerate(geometry_of(tiny.adapter).layers):
        plan = perturbation_plan(tiny, scores, layer, "mlp")
        assert changed_layers(plan) == [layer]
        kept = plan.layers[layer]
        assert len(kept.heads) == shape.num_heads and len(kept.kv_heads) == shape.num_kv_heads
        removed = sorted(set(range(shape.intermediate_size)) - set(kept.channels))
        assert len(removed) == round(0.25 * shape.intermediate_size)
        assert max(scores[layer].channels[removed]) <= min(scores[layer].channels[list(kept.channels)])


def test_estimates_match_the_runner_and_pruning_leaves_the_model_dense(tiny, evalset, result):
    # The row's metrics are the runner's aggregates, and the loaded model was never sliced.
    dense_eval = PlanEvaluator(tiny, evalset, batch_size=16).dense_metrics
    assert result.dense["pope_bacc"].value == pytest.approx(PlanEvaluator.pope_balanced_accuracy(dense_eval))
    assert result.dense["sqa"].value == pytest.approx(dense_eval["scienceqa"]["accuracy"])
    row = result.rows[0]
    assert row.drops["pope_bacc_drop"].value == pytest.approx(result.dense["pope_bacc"].value
                                                              - row.metrics["pope_bacc"].value)
    assert row.drops["sqa_drop"].value == pytest.approx(result.dense["sqa"].value - row.metrics["sqa"].value)


def test_paired_drop_and_merged_questions_by_hand(evalset):
    # SQA: differences +1, 0, 0, -1 over four problems -> mean 0, plug-in variance 0.5, SE sqrt(0.5 * 4 / 16).
    terms = [Term(i, "sqa", 0.25, v) for i, v in enumerate((1.0, 0.0, 0.0, -1.0))]
    assert linear_estimate(terms).value == 0.0
    assert linear_estimate(terms).se == pytest.approx(math.sqrt(0.125))
    # The same question counted twice is one question with twice the weight, not two independent ones.
    twice = linear_estimate([Term("q", "s", 0.5, 1.0), Term("q", "s", 0.5, 1.0), Term("r", "s", 0.0, 0.0)])
    assert twice.value == 1.0
    # Identical answers give a zero drop with zero uncertainty.
    answers = Answers({s: [True] * len(q) for s, q in evalset.pope.items()}, [True] * len(evalset.sqa))
    drops = paired_drops(evalset, answers, answers)
    assert all(e.value == 0.0 and e.se == 0.0 for e in drops.values())
    assert summarize(evalset, answers)["pope_yes"].value == pytest.approx(1.0)


def fake_table(geometry: dict, fragile_layer: int) -> dict:
    def est(value: float, se: float) -> dict:
        return {"value": value, "se": se, "low": value - 1.96 * se, "high": value + 1.96 * se}

    rows = [{"layer": i, "perturbation": p, "pope_bacc_drop": est(0.2 if i == fragile_layer else 0.0, 0.01),
             "sqa_drop": est(0.0, 0.01)} for i in range(len(geometry["layers"])) for p in PERTURBATIONS]
    return {"criterion": "wanda-sp", "geometry": geometry, "rows": rows}


def test_inspect_fragility_prints_the_columns_next_to_the_plan(tiny, result, tmp_path, capsys):
    plan = build_plan(tiny, 0.4, "magnitude")
    plan.save(tmp_path / "plan.json")
    (tmp_path / "fragility.json").write_text(json.dumps(result.to_dict()))
    assert main(["inspect", "--fragility", str(tmp_path / "fragility.json"), str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "-1 head/group: POPE" in out and "-25% MLP: POPE" in out and plan.fingerprint in out
    lines = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(lines) == plan.geometry.num_layers
    row = result.row(0, "heads").drops["pope_bacc_drop"]
    assert f"{row.value:+.3f}±{row.se:.3f}" in lines[0]

    # A layer whose removal is significantly costly is named as cut (or kept) by the plan.
    table = fake_table(plan.geometry.to_dict(), fragile_layer=1)
    (tmp_path / "fake.json").write_text(json.dumps(table))
    assert main(["inspect", "--fragility", str(tmp_path / "fake.json"), str(tmp_path / "plan.json")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split() and line.split()[0].isdigit()]
    cuts_heads = len(plan.layers[1].heads) < plan.geometry.layers[1].num_heads
    assert ("cuts fragile heads" if cuts_heads else "keeps fragile heads") in lines[1]
    assert "fragile" not in lines[0]


def test_inspect_fragility_reads_an_export_folder(result, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llava", "--sparsity", "0.3", "--criterion", "magnitude", "--out", str(out),
                 "--quiet"]) == 0
    (tmp_path / "fragility.json").write_text(json.dumps(result.to_dict()))
    capsys.readouterr()
    assert main(["inspect", "--fragility", str(tmp_path / "fragility.json"), str(out), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [sorted(layer["fragility"]) for layer in layers] == [["heads", "mlp"]] * len(result.rows[::2])
    assert layers[0]["fragility"]["heads"]["pope_bacc_drop"] == result.row(0, "heads").to_dict()["pope_bacc_drop"]


def test_inspect_fragility_refuses_a_table_of_another_model(tiny, result, tmp_path, capsys):
    plan = PruningPlan.dense(geometry_of(load_model("tiny-llava-mha").adapter))
    plan.save(tmp_path / "plan.json")
    (tmp_path / "fragility.json").write_text(json.dumps(result.to_dict()))
    assert main(["inspect", "--fragility", str(tmp_path / "fragility.json"), str(tmp_path / "plan.json")]) == 2
    assert "another shape" in capsys.readouterr().err
