"""The plan evaluator: objectives against the dense model, mask-applied plans, cache, pre-screen."""

from __future__ import annotations

import pytest
from PIL import Image

from worker.hipp.errors import OptionError
from worker.hipp.evaluation.plan_evaluator import PRESCREEN_RETURN, EvalSet, PlanEvaluator, ScoringMode
from worker.hipp.pruning.plan import LayerPlan, PruningPlan, geometry_of
from worker.hipp.pruning.planner import build_plan
from worker.hipp.testbed.data import write_benchmarks


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_benchmarks(root, seed=5, pope_images=8, sqa_sizes={"train": 4, "val": 12, "test": 4})
    return EvalSet.from_dirs(root / "pope", root / "scienceqa", sqa_split="val")


def count_calls(loaded):
    """Counts language-model runs (the evaluator runs only the decoder per plan)."""
    calls = {"n": 0}
    loaded.adapter.language_model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_dense_plan_scores_one_and_plans_are_cached(tiny_gqa, evalset, tmp_path):
    evaluator = PlanEvaluator(tiny_gqa, evalset, s_max=0.5, batch_size=16, cache_path=tmp_path / "cache.jsonl")
    assert set(evaluator.dense_metrics["pope"]) == {"random", "popular", "adversarial"}
    dense = evaluator.evaluate(PruningPlan.dense(geometry_of(tiny_gqa.adapter)))
    assert dense.objectives.stability == pytest.approx(1.0)
    assert dense.objectives.compression == 0.0
    if evaluator.dense_metrics["scienceqa"]["accuracy"] > 0:
        assert dense.objectives.utility == pytest.approx(1.0)

    plan = build_plan(tiny_gqa, 0.4, "magnitude")
    calls = count_calls(tiny_gqa)
    first = evaluator.evaluate(plan)
    used = calls["n"]
    assert used > 0 and not first.cached and first.seconds > 0
    assert first.objectives.compression == pytest.approx(plan.sparsity / 0.5)
    second = evaluator.evaluate(plan)
    assert second.cached and calls["n"] == used, "a cache hit must not run the model"
    assert second.metrics == first.metrics
    # The disk cache serves a new evaluator in another mode, with objectives recomputed for that mode.
    matched = PlanEvaluator(tiny_gqa, evalset, target_sparsity=0.4, batch_size=16,
                            cache_path=tmp_path / "cache.jsonl")
    again = matched.evaluate(plan)
    assert again.cached and again.objectives.compression == pytest.approx(1 - abs(plan.sparsity - 0.4) / 0.4)


def test_masked_evaluation_matches_the_physically_pruned_model(tiny_gqa, evalset):
    from worker.hipp.pruning.surgery import apply_plan

    evaluator = PlanEvaluator(tiny_gqa, evalset, batch_size=16)
    plan = build_plan(tiny_gqa, 0.5, "wanda-sp")
    masked = evaluator.evaluate(plan).metrics
    apply_plan(tiny_gqa.adapter, plan)
    assert evaluator._metrics(None) == masked


def test_scoring_mode_is_a_per_call_argument(tiny_gqa, evalset):
    evaluator = PlanEvaluator(tiny_gqa, evalset, s_max=0.5, batch_size=16)
    plan = build_plan(tiny_gqa, 0.4, "magnitude")
    matched = evaluator.evaluate(plan, mode=ScoringMode(0.5, target_sparsity=0.3))
    assert matched.objectives.compression == pytest.approx(1 - abs(plan.sparsity - 0.3) / 0.3)
    # The call's mode does not stay behind: the next call without one scores in the evaluator's own mode.
    free = evaluator.evaluate(plan)
    assert free.cached and free.metrics == matched.metrics
    assert free.objectives.compression == pytest.approx(plan.sparsity / 0.5)
    assert evaluator.mode == ScoringMode(0.5)
    wide = evaluator.evaluate(plan, mode=ScoringMode(0.8))
    assert wide.objectives.compression == pytest.approx(plan.sparsity / 0.8)
    assert (wide.objectives.utility, wide.objectives.robustness) == (free.objectives.utility,
                                                                      free.objectives.robustness)
    with pytest.raises(OptionError, match="s_max"):
        ScoringMode(1.2)


def test_images_are_read_through_the_given_loader(tiny_gqa, evalset):
    read: list[str] = []

    def load(path: str) -> Image.Image:
        read.append(path)
        with Image.open(path) as im:
            return im.convert("RGB")

    PlanEvaluator(tiny_gqa, evalset, batch_size=16, load_image=load)
    assert len(read) == evalset.size()
    assert not hasattr(PlanEvaluator, "_images"), "no image cache shared between evaluators"


def test_prescreen_skips_plans_that_empty_a_layer(tiny_gqa, evalset):
    evaluator = PlanEvaluator(tiny_gqa, evalset, batch_size=16)
    g = geometry_of(tiny_gqa.adapter)
    layers = [LayerPlan.dense(s) for s in g.layers]
    layers[1] = LayerPlan((0,), (0,), ())
    calls = count_calls(tiny_gqa)
    plan = PruningPlan(g, layers)
    result = evaluator.evaluate(plan)
    assert result.prescreened and calls["n"] == 0
    assert result.objectives.utility == PRESCREEN_RETURN and result.rho[1] == 0.0
    again = evaluator.evaluate(plan, mode=ScoringMode(0.8))
    assert again.cached and again.prescreened and calls["n"] == 0
    assert again.objectives.compression == pytest.approx(plan.sparsity / 0.8)


def test_empty_evaluation_set_is_refused():
    from worker.hipp.errors import OptionError

    with pytest.raises(OptionError, match="evaluation set is empty"):
        EvalSet.from_dirs(None, None)


def test_decoder_only_scoring_matches_the_full_model(tiny_gqa, evalset):
    from worker.hipp.evaluation.runner import evaluate_pope_split, evaluate_sqa

    evaluator = PlanEvaluator(tiny_gqa, evalset, batch_size=16)
    for split, questions in evalset.pope.items():
        full = evaluate_pope_split(tiny_gqa.model, tiny_gqa.processor, questions, batch_size=16)
        assert evaluator.dense_metrics["pope"][split] == full.metrics.to_dict()
    full_sqa = evaluate_sqa(tiny_gqa.model, tiny_gqa.processor, evalset.sqa, batch_size=16)
    assert evaluator.dense_metrics["scienceqa"] == full_sqa.metrics.to_dict()


def test_a_bias_compensated_plan_scores_what_the_compensated_sliced_model_scores(evalset):
    import copy

    from worker.hipp.calibration_source import default_samples
    from worker.hipp.models.loading import load_model
    from worker.hipp.pruning.baselines.flap import build_flap_plan
    from worker.hipp.pruning.surgery import apply_plan

    loaded = load_model("testbed")
    flap = build_flap_plan(loaded, 0.5, default_samples("testbed", 16), batch_size=8)
    evaluator = PlanEvaluator(loaded, evalset, batch_size=16)
    compensated = evaluator.evaluate(flap.plan, prescreen=False, compensation=flap.compensation)
    zeroed = evaluator.evaluate(flap.plan, prescreen=False)
    assert not zeroed.cached, "compensated and zeroed metrics are cached apart"
    assert compensated.fingerprint != zeroed.fingerprint

    sliced = copy.deepcopy(loaded)
    apply_plan(sliced.adapter, flap.plan, flap.compensation)
    assert PlanEvaluator(sliced, evalset, batch_size=16).dense_metrics == compensated.metrics
    # The check is not vacuous: on these questions compensation changes what the pruned model answers.
    assert compensated.metrics != zeroed.metrics
    plain = copy.deepcopy(loaded)
    apply_plan(plain.adapter, flap.plan)
    assert PlanEvaluator(plain, evalset, batch_size=16).dense_metrics == zeroed.metrics
