"""Plots of plans: per-layer allocation (layer sparsity, kept heads and MLP width)."""

from __future__ import annotations

from pathlib import Path

from worker.hipp.plan import PruningPlan


def plot_allocation(plan: PruningPlan, path: Path, title: str = "") -> Path:
    """Bar chart of each decoder layer's sparsity, with kept heads and MLP channels as fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(plan.geometry.num_layers))
    heads = [len(lp.heads) / s.num_heads for lp, s in zip(plan.layers, plan.geometry.layers, strict=True)]
    mlp = [len(lp.channels) / s.intermediate_size for lp, s in zip(plan.layers, plan.geometry.layers, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers)), 3.8))
    ax.bar(layers, plan.layer_sparsities(), color="tab:red", alpha=0.6, label="layer sparsity")
    ax.plot(layers, heads, "o-", label="kept query heads (fraction)")
    ax.plot(layers, mlp, "s-", label="kept MLP channels (fraction)")
    ax.axhline(plan.sparsity, color="gray", ls="--", lw=1, label=f"overall {plan.sparsity:.3f}")
    ax.set_xlabel("decoder layer")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"plan {plan.fingerprint}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
