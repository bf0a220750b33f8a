"""Docs quote numbers generated from the benchmark JSON: the verdict's arithmetic and wording, the block
rewriting, and that the committed docs match the committed results."""

from __future__ import annotations

import pytest

from bench import docs
from bench.verdict import HIPP, compare, conclusion


def cell(name, requested, pope, pope_se, sqa, sqa_se=0.01):
    return {"baseline": name, "requested": requested, "sparsity": requested, "pope_bacc": pope, "pope_se": pope_se,
            "sqa": sqa, "sqa_se": sqa_se}


def test_the_verdict_compares_hipp_with_the_best_baseline_at_its_sparsity_with_intervals():
    rows = [cell("dense", 0.0, 0.95, 0.005, 0.93),
            cell(HIPP, 0.5, 0.94, 0.006, 0.90), cell("a", 0.5, 0.80, 0.008, 0.85), cell("b", 0.5, 0.86, 0.008, 0.70),
            cell("b", 0.6, 0.99, 0.001, 0.99),  # another sparsity: not compared with HiPP at 50%
            {"baseline": "c", "requested": 0.5, "sparsity": 0.5, "infeasible": "too deep"}]
    (v,) = compare(rows)
    assert v["best_on_pope"]["plan"] == "b" and v["best_on_sqa"]["plan"] == "a"
    assert v["pope"]["difference"] == pytest.approx(0.08)
    half = 1.96 * (0.006**2 + 0.008**2) ** 0.5
    assert v["pope"]["low"] == pytest.approx(0.08 - half, abs=1e-4)
    assert v["pope"]["high"] == pytest.approx(0.08 + half, abs=1e-4)
    assert v["baselines_compared"] == 2 and v["baselines_within_interval"] == 0
    assert conclusion(v).startswith("50%: HiPP is ahead of every baseline on POPE")
    assert "ahead of every baseline on ScienceQA" in conclusion(v)


def test_a_difference_inside_the_interval_is_called_noise():
    rows = [cell(HIPP, 0.3, 0.941, 0.007, 0.88), cell("x", 0.3, 0.945, 0.007, 0.93)]
    (v,) = compare(rows)
    assert v["pope"]["low"] < 0 < v["pope"]["high"]
    text = conclusion(v)
    assert "within noise (1 of 1 baselines are)" in text and "behind x on ScienceQA" in text


def test_blocks_are_rewritten_and_stale_ones_named(monkeypatch):
    monkeypatch.setitem(docs.BLOCKS, "demo", lambda: "| a | 1 |")
    text = "intro\n<!-- bench:demo -->\nold numbers\n<!-- /bench:demo -->\nrest\n"
    new, changed = docs.render(text)
    assert new == "intro\n<!-- bench:demo -->\n| a | 1 |\n<!-- /bench:demo -->\nrest\n"
    assert changed == ["demo"]
    assert docs.render(new) == (new, [])
    with pytest.raises(SystemExit, match="unknown generated block 'nope'"):
        docs.render("<!-- bench:nope -->\nx\n<!-- /bench:nope -->")


def test_the_committed_docs_quote_the_committed_benchmark_results(capsys):
    assert docs.main(["--check"]) == 0, capsys.readouterr().err
    # Every generated block in the docs is one the generator knows, and the docs have some.
    found = [m.group("name") for path in docs.documents() for m in docs.BLOCK.finditer(path.read_text())]
    assert set(found) == set(docs.BLOCKS)
