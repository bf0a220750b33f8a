"""The fast decode path (static KV cache, compiled where asked) gives the same tokens as eager generation on
pruned models whose layers all have different widths, in memory and after export; latency figures are
measured, not assumed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import calibration_batch
from worker.hipp.checkpoint.export import export_loaded
from worker.hipp.models.decoding import EAGER, DecodeOptions, generate, latency_report, measure_latency
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan

STATIC_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             cache_implementation="static", disable_compile=True)
    torch.save(out, sys.argv[3])
    """
)


def per_layer_pruned(loaded):  # type: ignore[no-untyped-def]
    plan = build_plan(loaded, 0.45, "wanda-sp", allocation="random", seed=3)
    apply_plan(loaded.adapter, plan)
    shapes = {(layer.num_heads, layer.num_kv_heads, layer.intermediate_size) for layer in loaded.adapter.layers()}
    assert len(shapes) > 1, "the plan must give layers different widths"
    return plan


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_qwen25"])
def test_static_cache_gives_the_eager_tokens_on_per_layer_shapes(request, fixture, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = request.getfixturevalue(fixture)
    plan = per_layer_pruned(loaded)
    batch = dict(calibration_batch(loaded, n=2))
    eager = generate(loaded.model, batch, max_new_tokens=6, min_new_tokens=6, options=EAGER)
    static = generate(loaded.model, batch, max_new_tokens=6, min_new_tokens=6,
                      options=DecodeOptions(static_cache=True, compile=False))
    assert torch.equal(eager, static)

    # ... and a user who loads the export with plain transformers gets the same tokens from the static cache.
    export_loaded(loaded, tmp_path / "export", plan=plan)
    torch.save(batch, tmp_path / "batch.pt")
    result = subprocess.run([sys.executable, "-I", "-c", STATIC_RELOAD, str(tmp_path / "export"),
                             str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), eager)


def test_compiled_static_decode_gives_the_eager_tokens(tiny_gqa) -> None:  # type: ignore[no-untyped-def]
    per_layer_pruned(tiny_gqa)
    batch = dict(calibration_batch(tiny_gqa, n=1))
    eager = generate(tiny_gqa.model, batch, max_new_tokens=5, min_new_tokens=5, options=EAGER)
    compiled = generate(tiny_gqa.model, batch, max_new_tokens=5, min_new_tokens=5,
                        options=DecodeOptions(static_cache=True, compile=True))
    assert torch.equal(eager, compiled)


def test_latency_is_measured_and_reported_against_the_ideal(tiny_gqa) -> None:  # type: ignore[no-untyped-def]
    batch = dict(calibration_batch(tiny_gqa, n=1))
    dense = measure_latency(tiny_gqa.model, batch, new_tokens=4, repeats=1, options=EAGER)
    assert dense["prefill_ms"] > 0 and dense["decode_ms_per_token"] >= 0
    assert dense["prompt_tokens"] == batch["input_ids"].shape[1] and dense["compiled"] is False
    report = latency_report(dense, {**dense, "prefill_ms": dense["prefill_ms"] / 2}, ideal_speedup=1.6,
                            device="cpu")
    assert report["speedup"]["prefill"] == pytest.approx(2.0, rel=1e-3)
    assert report["speedup_over_ideal"]["prefill"] == pytest.approx(2.0 / 1.6, rel=1e-3)
