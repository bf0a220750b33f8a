"""HiPP's committed matched plans against every baseline at the same requested sparsity: the verdict table.

``bench.baselines`` evaluates the committed HiPP plans (``bench/results/plans/hipp-*.json``) on the same test
questions as every baseline; this module compares them. For each sparsity the best baseline by POPE mean
balanced accuracy (equal-budget selections and FLAP included) is set against HiPP, with 95% intervals of the
differences: paired bootstrap over the questions both plans answered (``evaluation.intervals``) when the rows
carry their per-question outcomes; otherwise the two cells' standard errors in quadrature, a normal
approximation that treats them as independent (conservative: it ignores that the questions are shared).
``docs/method.md`` quotes :func:`verdict_markdown` of the committed JSON (``python -m bench.docs`` rewrites
the block; a test checks it is current).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from worker.hipp.evaluation.intervals import paired_difference, pope_mean, sqa_accuracy

HIPP = "HiPP (committed matched plan)"
Z95 = 1.96


def sqa_se(row: dict[str, Any]) -> float:
    return float(row.get("sqa_se", math.nan))


def _difference(a: float, se_a: float, b: float, se_b: float) -> dict[str, Any]:
    d, se = a - b, math.hypot(se_a, se_b)
    return {"difference": round(d, 4), "low": round(d - Z95 * se, 4), "high": round(d + Z95 * se, 4),
            "method": "normal"}


def difference(a: dict[str, Any], b: dict[str, Any], task: str) -> dict[str, Any]:
    """``a - b`` on ``task`` (``pope`` or ``sqa``) with its 95% interval, paired when both carry outcomes."""
    value, se = ("pope_bacc", "pope_se") if task == "pope" else ("sqa", "sqa_se")
    if "outcomes" in a and "outcomes" in b:
        statistic = pope_mean if task == "pope" else sqa_accuracy
        low, high = paired_difference(a["outcomes"], b["outcomes"], statistic)
        return {"difference": round(a[value] - b[value], 4), "low": low, "high": high, "method": "paired bootstrap"}
    return _difference(a[value], float(a.get(se, math.nan)), b[value], float(b.get(se, math.nan)))


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per requested sparsity of a HiPP row: HiPP, the best baseline on POPE, and the POPE / SQA differences."""
    baselines = [r for r in rows if r["baseline"] not in (HIPP, "dense") and "infeasible" not in r]
    verdict = []
    for hipp in sorted((r for r in rows if r["baseline"] == HIPP), key=lambda r: r["requested"]):
        same = [r for r in baselines if math.isclose(r["requested"], hipp["requested"])]
        if not same:
            continue
        best = max(same, key=lambda r: r["pope_bacc"])
        best_sqa = max(same, key=lambda r: r["sqa"])
        pope = difference(hipp, best, "pope")
        sqa = difference(hipp, best, "sqa")
        sqa_vs_best_sqa = difference(hipp, best_sqa, "sqa")
        verdict.append({
            "requested": hipp["requested"], "hipp": _cell(hipp), "best_on_pope": _cell(best),
            "best_on_sqa": _cell(best_sqa), "pope": pope, "sqa": sqa, "sqa_vs_best_on_sqa": sqa_vs_best_sqa,
            "baselines_compared": len(same),
            "baselines_within_interval": sum(1 for r in same if difference(hipp, r, "pope")["low"] <= 0),
        })
    return verdict


def _cell(row: dict[str, Any]) -> dict[str, Any]:
    return {"plan": row["baseline"], "sparsity": row["sparsity"], "pope": row["pope_bacc"],
            "pope_se": row["pope_se"], "pope_ci": row.get("pope_ci"), "sqa": row["sqa"], "sqa_se": sqa_se(row),
            "sqa_ci": row.get("sqa_ci")}


def _value(cell: dict[str, Any], task: str) -> str:
    """``0.941 [0.930, 0.952]`` with the bootstrap interval, else ``0.941 ± 0.006`` with the standard error."""
    ci = cell.get(f"{task}_ci")
    if ci:
        return f"{cell[task]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{cell[task]:.3f} ± {cell[f'{task}_se']:.3f}"


def _points(d: dict[str, float]) -> str:
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def verdict_markdown(verdict: Sequence[dict[str, Any]]) -> str:
    """The table and one line of conclusion per sparsity, from :func:`compare`'s output."""
    if not verdict:
        return "No committed HiPP plan was evaluated in this run."
    header = ("| sparsity | HiPP POPE / SQA [95%] | best baseline on POPE (POPE / SQA) | POPE diff, points [95%] "
              "| SQA diff, points [95%] | best baseline on SQA | SQA diff vs it [95%] |\n|---|---|---|---|---|---|---|")
    lines = [header]
    for v in verdict:
        h, b, q = v["hipp"], v["best_on_pope"], v["best_on_sqa"]
        lines.append(
            f"| {round(100 * v['requested'])}% | {_value(h, 'pope')} / {_value(h, 'sqa')} "
            f"| {b['plan']} {_value(b, 'pope')} / {_value(b, 'sqa')} | {_points(v['pope'])} "
            f"| {_points(v['sqa'])} | {q['plan']} {_value(q, 'sqa')} | {_points(v['sqa_vs_best_on_sqa'])} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {conclusion(v)}" for v in verdict)


def conclusion(v: dict[str, Any]) -> str:
    """One sentence per sparsity, worded from the intervals alone."""
    s = f"{round(100 * v['requested'])}%"
    pope, sqa = v["pope"], v["sqa_vs_best_on_sqa"]
    if pope["low"] > 0:
        on_pope = f"HiPP is ahead of every baseline on POPE (by {100 * pope['difference']:.1f} points over the best)"
    elif pope["high"] < 0:
        on_pope = f"HiPP is behind the best baseline on POPE ({v['best_on_pope']['plan']})"
    else:
        on_pope = (f"HiPP and the best baseline on POPE ({v['best_on_pope']['plan']}) are within noise "
                   f"({v['baselines_within_interval']} of {v['baselines_compared']} baselines are)")
    if sqa["low"] > 0:
        on_sqa = "ahead of every baseline on ScienceQA"
    elif sqa["high"] < 0:
        on_sqa = f"behind {v['best_on_sqa']['plan']} on ScienceQA"
    else:
        on_sqa = f"level with the best on ScienceQA ({v['best_on_sqa']['plan']}) within noise"
    return f"{s}: {on_pope}; {on_sqa}."
