"""Qwen2.5-VL / Qwen2-VL particulars: image tokens and mRoPE inputs, portable export with the processor.
Masks and surgery are checked for every family in test_surgery.py.

The tiny built-ins keep the family's particulars: 8 query heads over 2 KV heads, q/k/v biases, multimodal
RoPE, a processor that expands <|image_pad|> per image_grid_thw and returns mm_token_type_ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.surgery_checks import logits
from worker.hipp.checkpoint.export import PLAN_FILE, export_pruned
from worker.hipp.data.calibration import _keep_tail, iter_batches, synthetic_samples
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan


@pytest.fixture
def qwen25() -> LoadedModel:
    return load_model("tiny-qwen2.5-vl")


def batch(loaded: LoadedModel, n: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    return next(iter_batches(loaded, synthetic_samples(n, seed=seed), batch_size=n))


def make_plan(loaded: LoadedModel, sparsity: float, criterion: str) -> PruningPlan:
    # Eight calibration prompts are plenty for a 4-layer model and keep the suite fast.
    return build_plan(loaded, sparsity, criterion, samples=synthetic_samples(8, seed=1))


# --- adapter and inputs ------------------------------------------------------------------------------


def test_adapter_sees_gqa_with_qkv_biases(qwen25):
    assert qwen25.adapter.family == "qwen2_vl"
    shape = qwen25.adapter.layer_shapes()[0]
    assert (shape.num_heads, shape.num_kv_heads, shape.group_size) == (8, 2, 4)
    assert shape.head_dim == qwen25.adapter.hidden_size // shape.num_heads
    assert shape.attention_bias and not shape.o_bias and not shape.mlp_bias
    assert qwen25.adapter.layer(0).k_proj.bias is not None


def test_calibration_batches_carry_grid_and_token_types(qwen25):
    inputs = batch(qwen25)
    grid = inputs["image_grid_thw"]
    assert grid.shape == (4, 3)
    assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape
    merge = qwen25.model.config.vision_config.spatial_merge_size
    # One <|image_pad|> per merged patch, marked as image (1) in mm_token_type_ids and nowhere else.
    image = qwen25.adapter.image_token_mask(inputs)
    assert image.sum(1).tolist() == (grid.prod(-1) // merge**2).tolist()
    assert torch.equal(image, inputs["mm_token_type_ids"] == 1)
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_image_tokens_lie_between_vision_markers(qwen25):
    inputs = batch(qwen25, n=2)
    config = qwen25.model.config
    for ids, image in zip(inputs["input_ids"], qwen25.adapter.image_token_mask(inputs), strict=True):
        start = int((ids == config.vision_start_token_id).nonzero()[0])
        end = int((ids == config.vision_end_token_id).nonzero()[0])
        expected = torch.zeros_like(image)
        expected[start + 1 : end] = True
        assert torch.equal(image, expected)


def test_prompts_use_the_qwen_chat_template(qwen25):
    prompt = qwen25.adapter.format_prompt(qwen25.processor, "Is there a red circle?")
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a red circle?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|image_pad|>" in qwen25.adapter.fallback_prompt("q")


def test_missing_mm_token_type_ids_are_rebuilt(qwen25):
    # Without mm_token_type_ids Qwen2.5-VL silently uses 1-D positions: the adapter must restore them.
    inputs = batch(qwen25, n=2)
    stripped = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert (logits(qwen25, stripped) - logits(qwen25, inputs)).abs().max().item() > 1e-4
    rebuilt = qwen25.adapter.prepare_inputs(stripped)
    assert torch.equal(rebuilt["mm_token_type_ids"], inputs["mm_token_type_ids"])
    assert torch.equal(logits(qwen25, rebuilt), logits(qwen25, inputs))


def test_sequence_cap_cuts_every_per_token_tensor(qwen25):
    # Columns that are padding in every row may be cut; mm_token_type_ids must be cut with input_ids.
    inputs = batch(qwen25, n=2)
    pad_id = qwen25.processor.tokenizer.pad_token_id

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([torch.full_like(t[:, :3], value), t], dim=1)

    padded = {**inputs, "input_ids": left_pad(inputs["input_ids"], pad_id),
              "attention_mask": left_pad(inputs["attention_mask"], 0),
              "mm_token_type_ids": left_pad(inputs["mm_token_type_ids"], 0)}
    capped = _keep_tail(padded, inputs["input_ids"].shape[1])
    assert capped.keys() == inputs.keys()
    for key, value in inputs.items():
        assert torch.equal(capped[key], value), key


def test_attention_weights_reach_image_tokens(qwen25):
    # What a generic attention-flow module needs: eager weights from every layer's attention module and
    # the adapter's image-token mask to read text -> image mass from them.
    inputs = batch(qwen25, n=2)
    image = qwen25.adapter.image_token_mask(inputs)
    seen: list[torch.Tensor] = []
    handles = [layer.attention.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
               for layer in qwen25.adapter.layers()]
    qwen25.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            qwen25.model(**inputs, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(qwen25.adapter.layers())
    last_query = inputs["input_ids"].shape[1] - 1
    for weights in seen:
        assert weights.shape[:2] == (2, 8)
        mass = (weights.mean(1)[:, last_query] * image).sum(-1)
        assert bool((mass > 0).all()) and bool((mass < 1).all())


# --- export ------------------------------------------------------------------------------------------

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = sys.argv[1]
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    batch = torch.load(path + "/../batch.pt")
    prompt = open(path + "/../prompt.txt").read()
    again = processor(text=[prompt], images=[Image.open(path + "/../image.png")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    torch.save({"logits": logits, "processed": dict(again)}, path + "/../reloaded.pt")
    print(json.dumps({"class": type(model).__name__, "info": {k: sorted(map(str, v)) for k, v in info.items()},
                      "generated": list(generated.shape), "processor": type(processor).__name__,
                      "template": processor.chat_template is not None}))
    """
)


def test_export_reloads_in_fresh_process_with_equal_logits(qwen25, tmp_path):
    samples = synthetic_samples(2, seed=3)
    inputs = next(iter_batches(qwen25, samples, batch_size=2))
    plan = make_plan(qwen25, 0.5, "wanda-sp")
    apply_plan(qwen25.adapter, plan)
    expected = logits(qwen25, inputs)
    out = tmp_path / "export"
    export_pruned(qwen25.model, qwen25.processor, qwen25.adapter, out, plan=plan)
    torch.save(dict(inputs), tmp_path / "batch.pt")
    samples[0].image.save(tmp_path / "image.png")
    prompt = qwen25.adapter.format_prompt(qwen25.processor, samples[0].question)
    (tmp_path / "prompt.txt").write_text(prompt)
    # -I: isolated mode, the project is not importable; only torch + transformers (+ the shipped files).
    result = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(out)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "HippQwen2_5_VLForConditionalGeneration"
    assert report["info"]["missing_keys"] == []
    assert report["info"]["unexpected_keys"] == []
    assert report["info"]["mismatched_keys"] == []
    assert report["generated"][1] == inputs["input_ids"].shape[1] + 4
    assert report["processor"] == "Qwen2_5_VLImageOnlyProcessor" and report["template"]
    reloaded = torch.load(tmp_path / "reloaded.pt")
    assert (reloaded["logits"] - expected).abs().max().item() <= 1e-5
    # The shipped processor produces the same ids, token types and image grid as the in-memory one.
    local = qwen25.processor(text=[prompt], images=[samples[0].image], return_tensors="pt")
    for key in ("input_ids", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(reloaded["processed"][key], local[key]), key
    config = json.loads((out / "config.json").read_text())
    assert config["hipp_base_model_type"] == "qwen2_5_vl"
    assert [layer["num_key_value_heads"] for layer in config["hipp_layers"]] == [len(lp.kv_heads) for lp in plan.layers]
    assert PruningPlan.load(out / PLAN_FILE).fingerprint == plan.fingerprint
    assert not any(p.name.endswith((".bin", ".pt", ".pkl")) for p in out.iterdir())


def test_exported_model_loads_through_the_engine(qwen25, tmp_path):
    plan = make_plan(qwen25, 0.3, "magnitude")
    apply_plan(qwen25.adapter, plan)
    export_pruned(qwen25.model, qwen25.processor, qwen25.adapter, tmp_path / "a", plan=plan)
    again = load_model(str(tmp_path / "a"))
    assert again.adapter.family == "qwen2_vl"
    assert [layer.num_kv_heads for layer in again.adapter.layers()] == [len(lp.kv_heads) for lp in plan.layers]
    inputs = batch(again)
    assert torch.allclose(logits(again, inputs), logits(qwen25, inputs), atol=1e-5)


def test_visual_sensitivity_on_qwen_finds_the_image_tokens(qwen25):
    from worker.hipp.data.calibration import synthetic_samples
    from worker.hipp.sensitivity import compute_visual_sensitivity

    result = compute_visual_sensitivity(qwen25, synthetic_samples(4, seed=0), batch_size=2)
    assert result.num_layers == 4 and result.samples == 4
    # Every text query after the image attends to some of it, never more than all of its mass.
    assert all(0.0 < d <= 1.0 for d in result.direct)
    assert all(0.0 < r <= 1.0 for r in result.rollout)
    assert len(result.direct_per_head[0]) == 8


def test_recovery_on_a_pruned_qwen_model_merges_and_keeps_shapes(qwen25):
    from worker.hipp.data.calibration import synthetic_samples
    from worker.hipp.pruning.planner import build_plan
    from worker.hipp.pruning.surgery import apply_plan
    from worker.hipp.recovery.conversations import Conversation
    from worker.hipp.recovery.training import RecoveryConfig, recover

    plan = build_plan(qwen25, 0.4, "wanda-sp")
    apply_plan(qwen25.adapter, plan)
    data = [Conversation(((s.question, "yes" if i % 2 else "no"),), s.image, f"q{i}")
            for i, s in enumerate(synthetic_samples(8, seed=1))]
    result = recover(qwen25, data, RecoveryConfig(method="lora", steps=4, batch_size=4))
    assert result.steps == 4
    assert not [k for k in qwen25.model.state_dict() if "lora_" in k]
    assert [(la.num_heads, la.num_kv_heads, la.intermediate_size) for la in qwen25.adapter.layers()] == [
        (len(lp.heads), len(lp.kv_heads), len(lp.channels)) for lp in plan.layers]
