"""Numbers in the docs come from the benchmark JSON: this module writes them.

A generated block in a markdown file sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
:data:`BLOCKS` says which function renders NAME from which committed JSON file. ``python -m bench.docs``
rewrites every block in ``docs/*.md`` and ``README.md``; ``python -m bench.docs --check`` exits 1 and names the
stale blocks (tests/test_bench_docs.py runs the check, so a benchmark re-run without regenerating the docs fails
CI).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.report import RESULTS
from bench.verdict import HIPP, verdict_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)
SUMMARY_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return data


def _source(name: str, data: dict[str, Any]) -> str:
    return f"From `bench/results/{name}.json` (`{data['command']}`, commit {data.get('commit', 'not recorded')})."


def _cells(rows: Sequence[dict[str, Any]], sparsities: Sequence[float]) -> dict[str, dict[float, dict[str, Any]]]:
    table: dict[str, dict[float, dict[str, Any]]] = {}
    for r in rows:
        if "infeasible" in r or r["baseline"] == "dense":
            continue
        for s in sparsities:
            if abs(r["requested"] - s) < 1e-6:
                table.setdefault(r["baseline"], {})[s] = r
    return table


def _pope_sqa(r: dict[str, Any] | None) -> str:
    """``POPE [95%] / SQA [95%]`` (bootstrap intervals; ``± SE`` for rows measured before they were kept)."""
    if not r:
        return "-"
    if "pope_ci" in r:
        (pl, ph), (sl, sh) = r["pope_ci"], r["sqa_ci"]
        return f"{r['pope_bacc']:.3f} [{pl:.3f}, {ph:.3f}] / {r['sqa']:.3f} [{sl:.3f}, {sh:.3f}]"
    return f"{r['pope_bacc']:.3f} ± {r['pope_se']:.3f} / {r['sqa']:.3f}"


def baselines_summary(name: str = "baselines_faithful") -> str:
    """Every method's POPE mean ± SE / SQA at 30-70%, with its monotonicity flag."""
    data = load(name)
    cells = _cells(data["rows"], SUMMARY_SPARSITIES)
    dense = next(r for r in data["rows"] if r["baseline"] == "dense")
    header = "| method | " + " | ".join(f"{round(100 * s)}%" for s in SUMMARY_SPARSITIES) + " | non-monotone |"
    lines = [header, "|" + "---|" * (len(SUMMARY_SPARSITIES) + 2),
             f"| dense | {_pope_sqa(dense)} |" + " |" * len(SUMMARY_SPARSITIES)]
    for method, by_s in cells.items():
        flag = "; ".join(data["flags"].get(method, [])) or ""
        lines.append(f"| {method} | " + " | ".join(_pope_sqa(by_s.get(s)) for s in SUMMARY_SPARSITIES)
                     + f" | {flag} |")
    return (f"{_source(name, data)} Cells: POPE mean balanced accuracy / ScienceQA accuracy with 95% intervals "
            f"({data['questions_per_plan']} test questions per plan).\n\n" + "\n".join(lines))


def baselines_verdict(name: str = "baselines_faithful") -> str:
    data = load(name)
    return f"{_source(name, data)}\n\n{verdict_markdown(data['verdict'])}"


def calibration_sensitivity(world: str = "baselines_faithful", synthetic: str = "baselines_synthetic") -> str:
    """Each method's POPE / SQA under the testbed's own calibration and under synthetic shapes, side by side."""
    a, b = load(world), load(synthetic)
    ca, cb = _cells(a["rows"], SUMMARY_SPARSITIES), _cells(b["rows"], SUMMARY_SPARSITIES)
    header = ("| method | " + " | ".join(f"{round(100 * s)}% {a['calibration']} -> {b['calibration']}"
                                        for s in SUMMARY_SPARSITIES) + " | mean POPE change |")
    lines = [header, "|" + "---|" * (len(SUMMARY_SPARSITIES) + 2)]
    for method in ca:
        if method == HIPP or method not in cb:
            continue
        pairs = [(ca[method].get(s), cb[method].get(s)) for s in SUMMARY_SPARSITIES]
        deltas = [y["pope_bacc"] - x["pope_bacc"] for x, y in pairs if x and y]
        cells = [f"{x['pope_bacc']:.3f} -> {y['pope_bacc']:.3f}" if x and y else "-" for x, y in pairs]
        mean = f"{sum(deltas) / len(deltas):+.3f}" if deltas else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
    return (f"{_source(world, a)}\n{_source(synthetic, b)} Cells: POPE mean balanced accuracy "
            f"(SE about {a['rows'][0]['pope_se']:.3f} per cell).\n\n" + "\n".join(lines))


def _ci(r: dict[str, Any], key: str, value: str) -> str:
    ci = r.get(f"{key}_ci")
    return f"{r[value]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{r[value]:.3f}"


def control_presets(name: str = "control") -> str:
    """What each named preference gets from the shipped policy (README and docs/method.md)."""
    data = load(name)
    dense = data["dense"]
    lines = ["| preference (utility, robustness, compression) | chosen sparsity | POPE mean [95%] | ScienceQA [95%] |",
             "|---|---|---|---|",
             f"| dense model | 0 | {_ci(dense, 'pope', 'pope_bacc')} | {_ci(dense, 'sqa', 'sqa')} |"]
    lines += [f"| {r['preset']} ({', '.join(f'{x:.2f}' for x in r['w'])}) | {r['sparsity']:.2f} "
              f"| {_ci(r, 'pope', 'pope_bacc')} | {_ci(r, 'sqa', 'sqa')} |" for r in data["presets"]]
    return f"{_source(name, data)}\n\n" + "\n".join(lines)


def trade_room(data: dict[str, Any], budget: str) -> str:
    """How far POPE moves along a fixed-budget sweep, against its 95% intervals: whether there is anything to
    trade at that budget (a rank correlation of points inside each other's intervals measures noise)."""
    rows = data["fixed_budgets"][budget]
    popes = [r["pope_bacc"] for r in rows]
    halves = sorted((r["pope_ci"][1] - r["pope_ci"][0]) / 2 for r in rows if r.get("pope_ci"))
    half = halves[len(halves) // 2] if halves else float("nan")
    return f"POPE spans {100 * (max(popes) - min(popes)):.1f} points along the line, intervals ±{100 * half:.1f}"


def control_sweeps(name: str = "control") -> str:
    """The w_C sweep's chosen sparsities and the fixed-budget correlations, with the targets."""
    data = load(name)
    sweep = data["compression_sweep"]
    checks = data["sweep_checks"]
    points = ", ".join(f"{r['w'][2]:.1f}: {r['sparsity']:.2f}" for r in sweep)
    rho = "; ".join(f"{round(100 * float(b))}%: Spearman(w_R, POPE) {v['spearman_wR_pope']:+.2f}, "
                    f"Spearman(w_U, SQA) {v['spearman_wU_sqa']:+.2f} ({trade_room(data, b)})"
                    for b, v in data["correlations"].items())
    return (f"{_source(name, data)}\n\n- Chosen sparsity along w_C (w_C: sparsity): {points}. Monotone: "
            f"{'yes' if checks['monotone'] else 'no'}; largest step {checks['largest_step']:.2f} (target <= 0.15: "
            f"{'met' if checks['smooth'] else 'missed'}).\n- Fixed budgets, w = (0.9(1-r), 0.9r, 0.1): {rho} "
            "(target Spearman(w_R, POPE) >= 0.8).")


def testbed_family() -> str:
    """Each testbed's dense metrics from its card's metrics.json (held-out files of the documented data seed)."""
    from worker.hipp.models.builtin import TESTBEDS

    lines = ["| model reference | decoder layers | POPE rand / pop / adv balanced accuracy | POPE mean [95%] "
             "| ScienceQA [95%] |", "|---|---|---|---|---|"]
    for name, folder in TESTBEDS.items():
        m = json.loads((folder / "metrics.json").read_text())
        layers = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
        pope = " / ".join(f"{m['pope'][s]['balanced_accuracy']:.3f}" for s in ("random", "popular", "adversarial"))
        mean = sum(m["pope"][s]["balanced_accuracy"] for s in m["pope"]) / len(m["pope"])
        ci = m.get("intervals", {})
        pci, sci = ci.get("pope_mean_balanced_accuracy"), ci.get("scienceqa_accuracy")
        pope_cell = f"{mean:.3f}" + (f" [{pci[0]:.3f}, {pci[1]:.3f}]" if pci else "")
        sqa_cell = f"{m['scienceqa']['accuracy']:.3f}" + (f" [{sci[0]:.3f}, {sci[1]:.3f}]" if sci else "")
        lines.append(f"| `{name}` | {layers} | {pope} | {pope_cell} | {sqa_cell} |")
    return ("From each model's `metrics.json` (its card: `hipp testbed card`; 3,000 POPE questions per split and "
            "1,200 ScienceQA test problems of data seed 1234).\n\n" + "\n".join(lines))


def control_transfer(names: Sequence[str] = ("control", "control_seed1_own", "control_deep_own", "control_seed1",
                                            "control_deep")) -> str:
    """Each testbed under the shipped ``testbed`` policy (transfer, no retraining) and under its own policy:
    each preset's plan against dense."""
    presets = [p["preset"] for p in load(names[-1])["presets"]]  # the named ones every run has
    rows = ["| model | policy | dense POPE / SQA | " + " | ".join(presets) + " | w_C sweep: monotone, largest step "
            "| at 50%: Spearman(w_R, POPE); room to trade |",
            "|" + "---|" * (len(presets) + 5)]
    sources = []
    for name in names:
        data = load(name)
        d, checks = data["dense"], data["sweep_checks"]
        by_name = {p["preset"]: p for p in data["presets"]}
        cells = [f"{by_name[n]['sparsity']:.2f}: {by_name[n]['pope_bacc']:.3f} / {by_name[n]['sqa']:.3f}"
                 if n in by_name else "-" for n in presets]
        rows.append(f"| `{data['model']}` | `{data['policy']}` | {d['pope_bacc']:.3f} / {d['sqa']:.3f} | "
                    + " | ".join(cells) + f" | {'yes' if checks['monotone'] else 'no'}, {checks['largest_step']:.2f} "
                    f"| {data['correlations']['0.5']['spearman_wR_pope']:+.2f}; {trade_room(data, '0.5')} |")
        sources.append(_source(name, data))
    return (" ".join(sources) + " Cells: chosen sparsity: POPE mean / ScienceQA on the development test files "
            "(intervals in the JSON).\n\n" + "\n".join(rows))


def _frozen_source(world_seed: int, name: str, data: dict[str, Any], extra: str = "") -> str:
    return (f"From `bench/results/frozen/{world_seed}/{name}.json` (`{data['command']}`, commit "
            f"{data.get('commit', 'not recorded')}{extra}).")


def frozen_report() -> str:
    """The newest frozen-protocol report: the goal table over the family, then each member's hypervolume and
    verdict."""
    from bench.frozen import report_dir, reported_seeds, summary_markdown

    seed = reported_seeds()[-1]
    out = report_dir(seed)
    summary: dict[str, Any] = json.loads((out / "frozen.json").read_text())
    parts = [f"{_frozen_source(seed, 'frozen', summary)} Fronts of HiPP and every baseline per member: "
             f"`bench/results/frozen/{seed}/frozen_fronts.png`.\n\n{summary_markdown(summary)}"]
    for model in summary["members"]:
        data: dict[str, Any] = json.loads((out / f"{model}.json").read_text())
        hv = data["hypervolume"]
        parts.append(f"#### {model} (policy `{data['policy']}`)\n\n"
                     + _frozen_source(seed, model, data, f"; {data['questions_per_plan']} test questions per plan")
                     + f" Hypervolume on the 30-70% grid: HiPP "
                     f"{hv['hipp']:.3f}, best baseline {hv['best_baseline']} {hv['best']:.3f}, ratio "
                     f"{hv['ratio']:.2f} (with HiPP's free-budget front: {hv['ratio_with_front']:.2f}).\n\n"
                     + verdict_markdown(data["verdict"]))
    return "\n\n".join(parts)


def frozen_earlier() -> str:
    """The earlier frozen-protocol reports' goal tables (each kept as it was, with its seed and design)."""
    from bench.frozen import report_dir, reported_seeds, summary_markdown

    parts = []
    for seed in reported_seeds()[:-1]:
        summary: dict[str, Any] = json.loads((report_dir(seed) / "frozen.json").read_text())
        parts.append(f"{_frozen_source(seed, 'frozen', summary)}\n\n{summary_markdown(summary)}")
    return "\n\n".join(parts) if parts else "No earlier report."


def recovery(name: str = "recovery") -> str:
    """Each plan before and after each recovery method, and the share of the pruning loss won back."""
    data = load(name)
    dense = data["dense"]
    lines = ["| plan | method | POPE mean | ScienceQA | POPE loss won back | SQA loss won back | seconds | steps |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | - | {dense['pope_bacc']:.3f} | {dense['sqa']:.3f} | | | | |"]
    for run in data["runs"]:
        pruned = run["pruned"]
        lines.append(f"| {run['plan']} | none | {pruned['pope_bacc']:.3f} | {pruned['sqa']:.3f} | | | | |")
        for method, r in run["methods"].items():
            m, share = r["metrics"], r["recovered_share"]
            lines.append(f"| {run['plan']} | {method} | {m['pope_bacc']:.3f} | {m['sqa']:.3f} "
                         f"| {share['pope_bacc']:.0%} | {share['sqa']:.0%} | {r['wall_seconds']:.0f} "
                         f"| {r['recovery']['steps']} |")
    return f"{_source(name, data)}\n\n" + "\n".join(lines)


def ablations(name: str = "ablations") -> str:
    """Each variant over its training seeds, and its seed-paired difference from the full policy."""
    from bench.ablations import markdown

    data = load(name)
    ids = ", ".join(f"{p['variant']} s{p['seed']} `{p['policy']}`" for p in data["policies"])
    return (f"{_source(name, data)} Policies: {ids}; {data['questions_per_plan']} test questions per plan, "
            f"preference {tuple(data['preference'])}.\n\n{markdown(data)}")


def allocation_source(name: str = "allocation_source") -> str:
    """Matched-sparsity plans from the head told the budget, the free-mode head, or both (what a job does)."""
    from bench.allocation_source import markdown

    data = load(name)
    policies = ", ".join(f"{m['model']} `{m['policy']}`" for m in data["members"])
    return f"{_source(name, data)} Policies: {policies}.\n\n{markdown(data)}"


BLOCKS: dict[str, Callable[[], str]] = {
    "ablations": ablations,
    "allocation-source": allocation_source,
    "control-transfer": control_transfer,
    "testbed-family": testbed_family,
    "control-presets": control_presets,
    "control-sweeps": control_sweeps,
    "baselines-summary": baselines_summary,
    "baselines-verdict": baselines_verdict,
    "calibration-sensitivity": calibration_sensitivity,
    "recovery": recovery,
    "frozen-report": frozen_report,
    "frozen-earlier": frozen_earlier,
}


def documents() -> list[Path]:
    """The files whose generated blocks are kept current: docs/*.md and the README."""
    return [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every known block regenerated, and the names of the blocks that changed."""
    changed: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        body = BLOCKS[name]().rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        new, changed = render(text)
        stale += [f"{path.name}:{name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    if args.check and stale:
        print("stale generated blocks (run python -m bench.docs): " + ", ".join(stale), file=sys.stderr)
        return 1
    print("regenerated: " + (", ".join(stale) or "nothing changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
