"""``hipp inspect --fragility TABLE PATH``: a plan's per-layer kept units next to each layer's fragility.

TABLE is a fragility table written by ``python -m bench.fragility`` (``bench/results/fragility.json``); PATH is
an export written by ``hipp prune`` or a plan JSON. For every layer the plan's kept query heads, KV heads and MLP
channels are printed beside what removing one query head per KV group, or 25% of the MLP, in that layer alone
costs on POPE (mean balanced accuracy) and ScienceQA, and a note where the plan cuts or keeps a fragile part.

Imports the engine's plan module only (and the export's file name); no torch work happens here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.hipp.errors import OptionError, PlanError
from worker.hipp.pruning.plan import ModelGeometry, PruningPlan

#: A perturbation is "fragile" when a drop's 95% interval lies above this (in accuracy points, 0-1 scale):
#: significant, and large enough to matter next to the noise of a 1,000-question benchmark.
FRAGILE_DROP = 0.01
DROPS = ("pope_bacc_drop", "sqa_drop")


def load_plan(path: Path) -> PruningPlan:
    """The plan of an export folder (its ``hipp_plan.json``) or a plan JSON file."""
    from worker.hipp.checkpoint.export import PLAN_FILE

    if path.is_dir():
        if not (path / PLAN_FILE).is_file():
            raise OptionError(f"{path} has no {PLAN_FILE}: not a HiPP-Prune export")
        return PruningPlan.load(path / PLAN_FILE)
    if path.is_file():
        return PruningPlan.load(path)
    raise OptionError(f"{path} is neither an export folder nor a plan JSON file")


def load_table(path: Path, plan: PruningPlan) -> dict[tuple[int, str], dict[str, Any]]:
    """Rows of the fragility table at ``path`` by (layer, perturbation); refuses a table of another model."""
    try:
        data = json.loads(path.read_text())
        rows = {(int(r["layer"]), str(r["perturbation"])): r for r in data["rows"]}
        geometry = ModelGeometry.from_dict(data["geometry"])
    except FileNotFoundError:
        raise OptionError(f"fragility table not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"{path} is not a fragility table (python -m bench.fragility writes one): {exc}") from None
    if geometry.layers != plan.geometry.layers or geometry.hidden_size != plan.geometry.hidden_size:
        raise PlanError(f"the fragility table {path} was measured on a model of another shape than this plan's")
    return rows


def drop_cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None or key not in row:
        return "-"
    return f"{row[key]['value']:+.3f}±{row[key]['se']:.3f}"


def is_fragile(row: dict[str, Any] | None) -> bool:
    return row is not None and any(row[k]["low"] > FRAGILE_DROP for k in DROPS if k in row)


def layer_note(plan: PruningPlan, layer: int, rows: dict[tuple[int, str], dict[str, Any]]) -> str:
    """Whether the plan cuts or keeps the parts of ``layer`` whose removal is significantly costly."""
    shape, kept = plan.geometry.layers[layer], plan.layers[layer]
    cut = {"heads": len(kept.heads) < shape.num_heads, "mlp": len(kept.channels) < shape.intermediate_size}
    fragile = [p for p in ("heads", "mlp") if is_fragile(rows.get((layer, p)))]
    return "; ".join(f"{'cuts' if cut[p] else 'keeps'} fragile {p}" for p in fragile)


def fragility_lines(plan: PruningPlan, rows: dict[tuple[int, str], dict[str, Any]]) -> list[str]:
    """The per-layer table: kept units of the plan, then the drops (value±SE) of each perturbation."""
    head = (f"{'layer':>5} {'heads':>9} {'kv':>7} {'mlp':>13} {'sparsity':>8} | {'-1 head/group: POPE':>19} "
            f"{'SQA':>12} | {'-25% MLP: POPE':>14} {'SQA':>12} | note")
    lines = [head]
    for i, (shape, lp, sp) in enumerate(zip(plan.geometry.layers, plan.layers, plan.layer_sparsities(), strict=True)):
        h, m = rows.get((i, "heads")), rows.get((i, "mlp"))
        lines.append(
            f"{i:>5} {len(lp.heads):>4}/{shape.num_heads:<4} {len(lp.kv_heads):>3}/{shape.num_kv_heads:<3} "
            f"{len(lp.channels):>6}/{shape.intermediate_size:<6} {sp:>8.3f} | {drop_cell(h, 'pope_bacc_drop'):>19} "
            f"{drop_cell(h, 'sqa_drop'):>12} | {drop_cell(m, 'pope_bacc_drop'):>14} {drop_cell(m, 'sqa_drop'):>12} | "
            f"{layer_note(plan, i, rows)}".rstrip())
    return lines


def print_fragility(path: Path, table: Path, as_json: bool = False) -> int:
    """``hipp inspect --fragility``: print the plan at ``path`` next to the fragility ``table``."""
    plan = load_plan(path)
    rows = load_table(table, plan)
    if as_json:
        layers = [{"layer": i, "heads": len(lp.heads), "kv_heads": len(lp.kv_heads), "channels": len(lp.channels),
                   "fragility": {p: rows.get((i, p)) for p in ("heads", "mlp")}, "note": layer_note(plan, i, rows)}
                  for i, lp in enumerate(plan.layers)]
        print(json.dumps({"plan": plan.fingerprint, "sparsity": plan.sparsity, "layers": layers}, indent=1))
        return 0
    print(f"{path}: plan {plan.fingerprint}, sparsity {plan.sparsity:.4f}, criterion {plan.meta.get('criterion')}, "
          f"allocation {plan.meta.get('allocation')}")
    print(f"fragility from {table}: drop vs dense when one query head per KV group, or 25% of the MLP channels, "
          f"is removed in that layer alone (positive = worse, ±1 SE); 'fragile' = 95% interval above "
          f"{FRAGILE_DROP}")
    print("\n".join(fragility_lines(plan, rows)))
    return 0
