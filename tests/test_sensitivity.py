"""Attention-flow visual sensitivity: hand-computed rollout, and a model built to look at the image in one layer."""

from __future__ import annotations

import pytest
import torch

from worker.hipp.data.calibration import synthetic_samples
from worker.hipp.plots import plot_sensitivity
from worker.hipp.sensitivity import (
    cached_visual_sensitivity,
    compute_visual_sensitivity,
    image_mass,
    rollout_step,
)


def test_rollout_matches_hand_computed_three_layer_example():
    # Position 0 is the image, positions 1 and 2 are text queries.
    layers = [
        torch.tensor([[1.0, 0, 0], [1, 0, 0], [0.5, 0.5, 0]]),
        torch.eye(3),
        torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]]),
    ]
    image = torch.tensor([[True, False, False]])
    queries = torch.tensor([[False, True, True]])
    rollout = torch.eye(3)[None]
    direct, flow = [], []
    for a in layers:
        direct.append(float(image_mass(a[None], image, queries)))
        rollout = rollout_step(rollout, a[None])
        flow.append(float(image_mass(rollout, image, queries)))
    assert direct == pytest.approx([0.75, 0.0, 1.0])
    # R1 rows: [.5,.5,0], [.25,.25,.5]; R2 = R1; R3 rows: [.75,.25,0], [.625,.125,.25]
    assert flow == pytest.approx([0.375, 0.375, 0.6875])


def make_layer_look_at_image(model, target: int, strength: float = 20.0) -> None:
    """Mark image positions in hidden dim 0 and text positions in dim 1; layer ``target`` attends by the
    image mark, every other layer by the text mark.

    Text embeddings carry (0, 5) in dims (0, 1), the projector writes (5, 0), and no layer writes to either.
    Queries are a constant bias and keys read one mark, on the slowest rotary pair so RoPE barely rotates them.
    """
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight[:, 0] = 0
        lm.embed_tokens.weight[:, 1] = 5.0
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[:2] = 0
        proj.bias[0], proj.bias[1] = 5.0, 0.0
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            d = attn.head_dim
            layer.input_layernorm.weight[:2] = 1.0
            for out in (attn.o_proj, layer.mlp.down_proj):
                out.weight[:2] = 0
                out.bias[:2] = 0
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.zero_()
            attn.k_proj.weight.zero_()
            attn.k_proj.bias.zero_()
            mark = 0 if i == target else 1
            for h in range(attn.q_proj.out_features // d):
                attn.q_proj.bias[h * d + d // 2 - 1] = strength
                attn.q_proj.bias[h * d + d - 1] = strength
            for g in range(attn.k_proj.out_features // d):
                attn.k_proj.weight[g * d + d // 2 - 1, mark] = 1.0
                attn.k_proj.weight[g * d + d - 1, mark] = 1.0


@pytest.mark.parametrize("target", [1, 2])
def test_sensitivity_peaks_at_the_layer_built_to_attend_to_the_image(tiny_bias, target):
    make_layer_look_at_image(tiny_bias.model, target)
    result = compute_visual_sensitivity(tiny_bias, synthetic_samples(4, seed=2), batch_size=2)
    assert max(range(4), key=lambda i: result.direct[i]) == target
    assert result.direct[target] > 0.95
    assert max(result.direct[i] for i in range(4) if i != target) < 0.05
    assert max(range(4), key=lambda i: result.increment[i]) == target
    heads = result.direct_per_head[target]
    assert min(heads) > 0.95 and len(heads) == 8
    norm = result.normalized()
    assert max(range(4), key=lambda i: norm[i]) == target


def test_sensitivity_restores_attention_implementation_and_caches(tiny_gqa, tmp_path):
    before = tiny_gqa.model.config._attn_implementation
    samples = synthetic_samples(2, seed=1)
    first = cached_visual_sensitivity(tiny_gqa, samples, tmp_path)
    assert tiny_gqa.model.config._attn_implementation == before
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1
    # A cache hit must not run the model: make the model unusable and ask again.
    tiny_gqa.model.forward = None
    again = cached_visual_sensitivity(tiny_gqa, samples, tmp_path)
    assert again.direct == first.direct and again.samples == 2
    png = plot_sensitivity(first, tmp_path / "s.png")
    assert png.stat().st_size > 1000


def test_policy_state_is_normalized_and_round_trips(tiny_gqa, tmp_path):
    from worker.hipp.policy.state import FEATURES, PolicyState, compute_policy_state

    state = compute_policy_state(tiny_gqa, synthetic_samples(4, seed=0), batch_size=4)
    assert state.features.shape == (4, len(FEATURES))
    assert torch.isfinite(state.features).all()
    depth = state.features[:, FEATURES.index("depth")]
    assert depth[0] == 0 and depth[-1] == 1
    for name in ("wanda_mean", "path_mass", "act_norm_mlp"):
        column = state.features[:, FEATURES.index(name)]
        assert abs(float(column.mean())) < 1e-5
    ablated = state.without(("visual_direct", "visual_increment"))
    assert ablated.features[:, FEATURES.index("visual_direct")].abs().sum() == 0
    state.save(tmp_path / "state.json")
    again = PolicyState.load(tmp_path / "state.json")
    assert torch.equal(again.features, state.features) and again.names == state.names
