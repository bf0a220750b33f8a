"""The testbed family: models trained by the shipped recipe on the same world (another training seed, a deeper
decoder), each a model reference with its card, its training log and its measured metrics."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from app import modelrefs
from app.config import Settings
from worker.hipp.calibration_source import choose_calibration
from worker.hipp.evaluation.tasks.pope import SPLITS
from worker.hipp.models.builtin import TESTBEDS, builtin_names, is_testbed

FAMILY = [name for name in TESTBEDS if name != "testbed"]
DEPTH = {"testbed-seed1": 6, "testbed-deep": 12}


def test_every_member_is_a_model_reference_the_service_accepts():
    assert set(FAMILY) == set(DEPTH)
    assert all(is_testbed(name) and name in builtin_names() for name in TESTBEDS)
    assert set(TESTBEDS) <= set(Settings().allowed_models)
    assert set(TESTBEDS) == set(modelrefs.TESTBEDS) and all(modelrefs.is_testbed(name) for name in TESTBEDS)
    assert not is_testbed("tiny-llava")


@pytest.mark.parametrize("name", FAMILY)
def test_members_ship_small_fp16_weights_a_card_and_their_training_log(name):
    folder = TESTBEDS[name]
    assert sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) <= 12 * 1024 * 1024
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    card = (folder / "README.md").read_text()
    assert f"model reference `{name}`" in card and "hipp testbed train" in card and "trained on:" in card
    assert f"Llama decoder with {DEPTH[name]} layers" in card
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert any("eval" in entry for entry in log)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert all(metrics["pope"][s]["n"] >= 1500 for s in SPLITS)
    assert "intervals" in metrics


@pytest.mark.parametrize("name", FAMILY)
def test_members_load_by_name_with_their_depth_and_calibrate_on_the_world(name):
    from worker.hipp.models.loading import load_model
    from worker.hipp.pruning.plan import geometry_of

    loaded = load_model(name)
    assert geometry_of(loaded.adapter).num_layers == DEPTH[name]
    assert choose_calibration(name, 4).source == "world"


@pytest.mark.parametrize("name", ["testbed-seed1", "testbed-deep"])
def test_members_have_their_own_shipped_policy_found_by_model_fingerprint(name):
    from worker.hipp.models.loading import load_model
    from worker.hipp.policy.store import SHIPPED, policy_for_model

    policy = policy_for_model(load_model(name).adapter)
    assert policy is not None and policy.path.parent == SHIPPED and policy.path.name == name
    assert policy.meta["training"]["steps"] == 36
    assert policy.policy.config.budget_head == "anchored"  # trained with the current design (bench.train_policies)
