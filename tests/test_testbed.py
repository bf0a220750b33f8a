"""The shipped testbed VLM: files, offline loading, documented metrics on held-out data, sensitivity to pruning.

Evaluation only (no training): the benchmark files are written from the documented data seed, the first
250 POPE images of the documented test set (1,500 questions per split) and 600 ScienceQA test problems.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from worker.hipp.evaluation.runner import evaluate
from worker.hipp.evaluation.tasks.pope import SPLITS
from worker.hipp.testbed import MODEL_DIR
from worker.hipp.testbed.data import DEFAULT_SEED, write_benchmarks

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="testbed not trained yet")

POPE_IMAGES = 250
SQA_TEST = 600


@pytest.fixture(scope="module")
def loaded():
    from worker.hipp.models.loading import load_model

    return load_model("testbed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed-bench")
    counts = write_benchmarks(out, DEFAULT_SEED, POPE_IMAGES, {"test": SQA_TEST})
    assert all(n >= 1500 for n in counts["pope"].values())
    return out


@pytest.fixture(scope="module")
def dense(loaded, data):
    return evaluate(loaded.model, loaded.processor, data / "pope", data / "scienceqa", batch_size=64)


def test_shipped_files_are_small_fp16_and_documented():
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 12 * 1024 * 1024
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}
    card = (MODEL_DIR / "README.md").read_text()
    assert "hipp testbed train" in card and "seed" in card
    documented = json.loads((MODEL_DIR / "metrics.json").read_text())
    assert all(documented["pope"][s]["n"] >= 1500 for s in SPLITS)


def test_loads_offline_with_the_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR)
    text = model.config.text_config
    assert text.num_hidden_layers >= 6 and text.num_attention_heads == 8
    assert model.config.model_type == "llava"
    assert "ASSISTANT:" in processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}], add_generation_prompt=True
    )


def test_reaches_the_documented_thresholds_on_held_out_images(dense):
    pope = dense["pope"]
    assert pope["random"]["balanced_accuracy"] >= 0.90
    assert pope["popular"]["balanced_accuracy"] >= 0.85
    assert pope["adversarial"]["balanced_accuracy"] >= 0.85
    for split in SPLITS:
        assert 0.40 <= pope[split]["yes_ratio"] <= 0.60
    assert dense["scienceqa"]["accuracy"] >= 0.75
    for kind, accuracy in dense["scienceqa"]["by_kind"].items():
        assert accuracy >= 0.6, kind  # every kind is learnt, not carried by the easy ones


def test_matches_the_model_card_metrics(dense):
    documented = json.loads((MODEL_DIR / "metrics.json").read_text())
    for split in SPLITS:
        here, there = dense["pope"][split], documented["pope"][split]
        se = math.hypot(here["balanced_accuracy_se"], there["balanced_accuracy_se"])
        assert abs(here["balanced_accuracy"] - there["balanced_accuracy"]) <= 4 * se + 0.01
    here_sqa, there_sqa = dense["scienceqa"], documented["scienceqa"]
    assert abs(here_sqa["accuracy"] - there_sqa["accuracy"]) <= 4 * math.hypot(
        here_sqa["accuracy_se"], there_sqa["accuracy_se"]
    )


def test_generated_answers_agree_with_logit_scoring(loaded, data):
    by_mode = {
        mode: evaluate(loaded.model, loaded.processor, data / "pope", data / "scienceqa", mode=mode, limit=60)
        for mode in ("logits", "generate")
    }
    for split in SPLITS:
        assert by_mode["generate"]["pope"][split]["balanced_accuracy"] == pytest.approx(
            by_mode["logits"]["pope"][split]["balanced_accuracy"], abs=0.05
        )
    assert by_mode["generate"]["scienceqa"]["accuracy"] == pytest.approx(
        by_mode["logits"]["scienceqa"]["accuracy"], abs=0.05
    )


def test_pruning_half_the_decoder_is_visible(loaded, data, dense):
    from worker.hipp.pruning.masking import apply_masks
    from worker.hipp.pruning.planner import build_plan

    plan = build_plan(loaded, 0.5, "magnitude", "uniform")
    assert plan.sparsity == pytest.approx(0.5, abs=0.05)
    with apply_masks(loaded.adapter, plan), torch.no_grad():
        pruned = evaluate(loaded.model, loaded.processor, data / "pope", batch_size=64, limit=None)
    for split in SPLITS:
        d, p = dense["pope"][split], pruned["pope"][split]
        se = math.hypot(d["balanced_accuracy_se"], p["balanced_accuracy_se"])
        assert d["balanced_accuracy"] - p["balanced_accuracy"] > 3 * se, split


def test_the_shipped_policy_belongs_to_the_shipped_testbed(loaded):
    """The testbed policy is keyed to the weights' fingerprint: retraining the testbed means retraining it."""
    from worker.hipp.policy.store import SHIPPED, load_policy_dir, policy_for_model

    found = policy_for_model(loaded.adapter)
    assert found is not None and found.id == load_policy_dir(SHIPPED / "testbed").id
