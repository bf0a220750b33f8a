"""Every plot the engine draws, in one place: per-layer allocation of a plan (fractions, or kept and removed
units), visual sensitivity, the GRPO learning curve, the front of sampled plans, the plans a job considered,
the baselines' accuracy curves and the per-layer fragility bars.

Each function writes one PNG and returns its path. matplotlib is imported on use with the file-only Agg
backend (workers and CI have no display); the engine's other modules never import it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.hipp import preference

if TYPE_CHECKING:
    from worker.hipp.policy.search import Candidate
    from worker.hipp.pruning.plan import PruningPlan
    from worker.hipp.sensitivity import VisualSensitivity

DPI = 110


@contextmanager
def figure(path: Path, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.5), nrows: int = 1,
           squeeze: bool = True) -> Iterator[Any]:
    """A figure with ``nrows`` x ``ncols`` axes (``plt.subplots``' ``squeeze``), laid out and saved to ``path``
    (folders made) when the block ends; closed either way. The benchmarks' plots use it too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=squeeze)
    try:
        yield fig, axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def plot_allocation(plan: PruningPlan, path: Path, title: str = "") -> Path:
    """Bar chart of each decoder layer's sparsity, with kept heads and MLP channels as fractions."""
    layers = list(range(plan.geometry.num_layers))
    heads = [len(lp.heads) / s.num_heads for lp, s in zip(plan.layers, plan.geometry.layers, strict=True)]
    mlp = [len(lp.channels) / s.intermediate_size for lp, s in zip(plan.layers, plan.geometry.layers, strict=True)]
    with figure(path, figsize=(max(6.0, 0.35 * len(layers)), 3.8)) as (_, ax):
        ax.bar(layers, plan.layer_sparsities(), color="tab:red", alpha=0.6, label="layer sparsity")
        ax.plot(layers, heads, "o-", label="kept query heads (fraction)")
        ax.plot(layers, mlp, "s-", label="kept MLP channels (fraction)")
        ax.axhline(plan.sparsity, color="gray", ls="--", lw=1, label=f"overall {plan.sparsity:.3f}")
        ax.set_xlabel("decoder layer")
        ax.set_ylim(0, 1.05)
        ax.set_title(title or f"plan {plan.fingerprint}")
        ax.legend(fontsize=7)
    return path


def plot_layer_units(plan: PruningPlan, path: Path, title: str = "") -> Path:
    """Per decoder layer, stacked bars of kept and removed query heads (left) and MLP channels (right)."""
    layers = list(range(plan.geometry.num_layers))
    shapes = plan.geometry.layers
    kept_heads = [len(lp.heads) for lp in plan.layers]
    kept_mlp = [len(lp.channels) for lp in plan.layers]
    panels = (("query heads", kept_heads, [s.num_heads for s in shapes]),
              ("MLP channels", kept_mlp, [s.intermediate_size for s in shapes]))
    with figure(path, ncols=2, figsize=(max(9.0, 0.5 * len(layers)), 3.8)) as (fig, axes):
        for ax, (unit, kept, total) in zip(axes, panels, strict=True):
            removed = [t - k for t, k in zip(total, kept, strict=True)]
            ax.bar(layers, kept, color="tab:blue", label=f"kept ({sum(kept)})")
            ax.bar(layers, removed, bottom=kept, color="tab:red", alpha=0.5, label=f"removed ({sum(removed)})")
            ax.set_xticks(layers)
            ax.set_xlabel("decoder layer")
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
        fig.suptitle(title or f"plan {plan.fingerprint}: sparsity {plan.sparsity:.3f}", fontsize=9)
    return path


@dataclass(frozen=True)
class PlanPoint:
    """One plan considered by a run: its sparsity, its measured accuracies (None: not measured), chosen or not."""

    sparsity: float
    utility: float | None
    robustness: float | None
    chosen: bool = False


def plot_plan_points(points: Sequence[PlanPoint], path: Path, title: str = "") -> Path:
    """Sparsity against utility (ScienceQA accuracy) and against robustness (POPE balanced accuracy) of the
    plans a run considered, the chosen one a star. A plan without measurements is a dashed line at its
    sparsity (evaluation was off)."""
    with figure(path, ncols=2, figsize=(10, 4)) as (fig, axes):
        for ax, (name, label) in zip(axes, (("utility", "ScienceQA accuracy (utility)"),
                                           ("robustness", "POPE balanced accuracy (robustness)")), strict=True):
            measured = [p for p in points if getattr(p, name) is not None]
            others = [p for p in measured if not p.chosen]
            if others:
                ax.scatter([p.sparsity for p in others], [getattr(p, name) for p in others], c="tab:gray",
                           label="considered")
            for p in measured:
                if p.chosen:
                    ax.scatter([p.sparsity], [getattr(p, name)], marker="*", s=220, c="tab:red", label="chosen")
            for p in points:
                if getattr(p, name) is None:
                    ax.axvline(p.sparsity, color="tab:red" if p.chosen else "tab:gray", ls="--",
                               label="chosen (not evaluated)" if p.chosen else None)
            ax.set_xlabel("decoder sparsity (compression)")
            ax.set_ylabel(label)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=7)
        fig.suptitle(title or "plans considered", fontsize=9)
    return path


def plot_sensitivity(result: VisualSensitivity, path: Path, title: str = "") -> Path:
    """Per-layer bar chart of direct mass and rollout increment, plus a per-head heat map."""
    import torch

    layers = list(range(result.num_layers))
    width = 0.4
    with figure(path, ncols=2, figsize=(11, 4)) as (fig, (ax1, ax2)):
        ax1.bar([x - width / 2 for x in layers], result.direct, width, label="direct text->image mass")
        ax1.bar([x + width / 2 for x in layers], result.increment, width, label="rollout increment")
        ax1.set_xlabel("decoder layer")
        ax1.set_ylabel("attention mass")
        ax1.legend()
        ax1.set_title(title or "visual sensitivity per layer")
        image = ax2.imshow(torch.tensor(result.direct_per_head).T.numpy(), aspect="auto", cmap="viridis")
        ax2.set_xlabel("decoder layer")
        ax2.set_ylabel("head")
        ax2.set_title("direct mass per head")
        fig.colorbar(image, ax=ax2)
    return path


def plot_learning_curve(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean GRPO return and the three objectives per step."""
    steps = [h["step"] for h in history]
    with figure(path, ncols=2, figsize=(10, 3.5)) as (_, (ax1, ax2)):
        ax1.plot(steps, [h["return"] for h in history], label="mean return")
        ax1.set_xlabel("GRPO step")
        ax1.legend()
        for key in preference.KEYS:
            ax2.plot(steps, [h[key] for h in history], label=key)
        ax2.set_xlabel("GRPO step")
        ax2.legend()
    return path


def plot_front(candidates: Sequence[Candidate], front: Sequence[Candidate], path: Path,
               baselines: dict[str, tuple[float, float]] | None = None) -> Path:
    """POPE balanced accuracy vs ScienceQA accuracy of the sampled plans, the front highlighted."""
    from worker.hipp.evaluation.plan_evaluator import PlanEvaluator

    def xy(c: Candidate) -> tuple[float, float]:
        m = c.evaluation.metrics
        return m.get("scienceqa", {}).get("accuracy", 0.0), PlanEvaluator.pope_balanced_accuracy(m)

    pts = [xy(c) for c in candidates if not c.evaluation.prescreened]
    fr = sorted(xy(c) for c in front)
    with figure(path) as (_, ax):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="lightgray", label="sampled plans")
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "o-", c="tab:red", label="non-dominated")
        for name, (x, y) in (baselines or {}).items():
            ax.scatter([x], [y], marker="x")
            ax.annotate(name, (x, y), fontsize=7)
        ax.set_xlabel("ScienceQA accuracy")
        ax.set_ylabel("POPE balanced accuracy (mean of splits)")
        ax.legend()
    return path


def plot_baselines(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each baseline's (ScienceQA, POPE) points across sparsities, the dense model as a star (``rows[0]``)."""
    names = sorted({r["baseline"] for r in rows if r["baseline"] != "dense"})
    with figure(path, figsize=(6.5, 4.5)) as (_, ax):
        for name in names:
            pts = sorted((r["sqa"], r["pope_bacc"], r["sparsity"]) for r in rows if r["baseline"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        dense = rows[0]
        ax.scatter([dense["sqa"]], [dense["pope_bacc"]], marker="*", s=150, c="black", label="dense")
        ax.set_xlabel("ScienceQA accuracy")
        ax.set_ylabel("POPE balanced accuracy")
        ax.legend(fontsize=7)
    return path


def plot_fragility(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Per-layer drops (POPE mean balanced accuracy, ScienceQA) when one query head per KV group, or 25% of the
    MLP, is removed in that layer alone; bars with 95% intervals (``fragility.FragilityResult.to_dict`` rows)."""
    layers = sorted({r["layer"] for r in rows})
    perturbations = {"heads": "-1 query head per KV group", "mlp": "-25% MLP channels"}
    width = 0.38
    with figure(path, ncols=2, figsize=(max(9.0, 0.8 * len(layers)), 3.8)) as (fig, axes):
        for ax, (key, label) in zip(axes, (("pope_bacc_drop", "POPE balanced accuracy"),
                                          ("sqa_drop", "ScienceQA accuracy")), strict=True):
            for k, (perturbation, name) in enumerate(perturbations.items()):
                found = {r["layer"]: r[key] for r in rows if r["perturbation"] == perturbation and key in r}
                xs = [i + (k - 0.5) * width for i in layers if i in found]
                values = [found[i]["value"] for i in layers if i in found]
                errors = [1.96 * found[i]["se"] for i in layers if i in found]
                ax.bar(xs, values, width, yerr=errors, capsize=2, label=name)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xticks(layers)
            ax.set_xlabel("decoder layer (perturbed alone)")
            ax.set_ylabel(f"drop in {label} vs dense")
            ax.legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
    return path
