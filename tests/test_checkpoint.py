"""Exports load in a fresh process with only torch + transformers, with the pruned model's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from worker.hipp.checkpoint.export import PLAN_FILE, export_pruned, export_zero_padded
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = sys.argv[1]
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True)
    AutoProcessor.from_pretrained(path, trust_remote_code=True)
    batch = torch.load(path + "/../batch.pt")
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    torch.save(logits, path + "/../reloaded.pt")
    print(json.dumps({"class": type(model).__name__, "info": {k: sorted(map(str, v)) for k, v in info.items()},
                      "generated": list(generated.shape), "modules": sorted({type(m).__module__.split('.')[0]
                                                                            for m in model.modules()})}))
    """
)


def reload_in_fresh_process(path):
    # -I: isolated mode, so the project itself is not importable there; only torch + transformers are used.
    result = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(path)], capture_output=True, text=True,
                            timeout=300, cwd=path.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_bias"])
def test_export_reloads_in_fresh_process_with_equal_logits(request, fixture, tmp_path, batch_for):
    loaded = request.getfixturevalue(fixture)
    batch = batch_for(loaded)
    plan = build_plan(loaded, 0.5, "wanda-sp")
    apply_plan(loaded.adapter, plan)
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    out = tmp_path / "export"
    export_pruned(loaded.model, loaded.processor, loaded.adapter, out, plan=plan, metrics={"x": 1})
    torch.save(dict(batch), tmp_path / "batch.pt")
    report = reload_in_fresh_process(out)
    assert report["class"] == "HippLlavaForConditionalGeneration"
    assert report["info"]["missing_keys"] == []
    assert report["info"]["unexpected_keys"] == []
    assert report["info"]["mismatched_keys"] == []
    assert report["generated"][1] == batch["input_ids"].shape[1] + 4
    reloaded = torch.load(tmp_path / "reloaded.pt")
    assert (reloaded - expected).abs().max().item() <= 1e-5
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_hipp_llava.py", "modeling_hipp_llava.py", PLAN_FILE,
            "metrics.json", "README.md", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((out / "config.json").read_text())
    assert [layer["num_attention_heads"] for layer in config["hipp_layers"]] == [len(lp.heads) for lp in plan.layers]
    assert PruningPlan.load(out / PLAN_FILE).fingerprint == plan.fingerprint


def test_exported_model_loads_through_the_engine_and_reexports(tiny_gqa, tmp_path, batch_for):
    from worker.hipp.models.loading import load_model

    plan = build_plan(tiny_gqa, 0.3, "magnitude")
    apply_plan(tiny_gqa.adapter, plan)
    export_pruned(tiny_gqa.model, tiny_gqa.processor, tiny_gqa.adapter, tmp_path / "a", plan=plan)
    again = load_model(str(tmp_path / "a"))
    assert again.adapter.family == "llava"
    assert [layer.num_heads for layer in again.adapter.layers()] == [len(lp.heads) for lp in plan.layers]
    batch = batch_for(tiny_gqa)
    with torch.no_grad():
        assert torch.allclose(again.model(**batch).logits, tiny_gqa.model(**batch).logits, atol=1e-5)
    export_pruned(again.model, again.processor, again.adapter, tmp_path / "b", plan=plan)
    third = load_model(str(tmp_path / "b"))
    with torch.no_grad():
        assert torch.allclose(third.model(**batch).logits, tiny_gqa.model(**batch).logits, atol=1e-5)


def test_zero_padded_export_loads_without_remote_code(tiny_gqa, tmp_path, batch_for):
    from transformers import AutoModelForImageTextToText

    batch = batch_for(tiny_gqa)
    plan = build_plan(tiny_gqa, 0.4, "wanda-sp")
    apply_plan(tiny_gqa.adapter, plan)
    with torch.no_grad():
        expected = tiny_gqa.model(**batch).logits
    export_zero_padded(tiny_gqa.model, tiny_gqa.processor, tiny_gqa.adapter, plan, tmp_path / "zp")
    config = json.loads((tmp_path / "zp" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "llava"
    dense, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "zp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (dense(**batch).logits - expected).abs().max().item() <= 1e-5


def test_exports_of_two_families_in_one_process_do_not_share_remote_code(tmp_path, batch_for):
    """Exports are cached by folder name in transformers' module cache: a LLaVA and a Qwen export that share
    the name must still each get their own classes (and key mappings) in one process."""
    from worker.hipp.models.loading import load_model

    for family, ref in (("llava", "tiny-llava"), ("qwen", "tiny-qwen2.5-vl")):
        loaded = load_model(ref)
        batch = batch_for(loaded)
        plan = build_plan(loaded, 0.3, "magnitude")
        apply_plan(loaded.adapter, plan)
        with torch.no_grad():
            expected = loaded.model(**batch).logits
        out = tmp_path / family / "export"
        export_pruned(loaded.model, loaded.processor, loaded.adapter, out, plan=plan)
        again = load_model(str(out))
        assert type(again.model).__name__.startswith("Hipp") and again.adapter.family == loaded.adapter.family
        with torch.no_grad():
            assert (again.model(**batch).logits - expected).abs().max().item() <= 1e-5
