"""The ``hipp prune`` / ``hipp inspect`` commands: happy path and one-line errors for bad input."""

from __future__ import annotations

import pytest

from worker.cli import main


def test_prune_then_inspect(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llava", "--sparsity", "0.3", "--criterion", "magnitude",
                 "--mlp-multiple", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    achieved = float(printed.split("sparsity ")[1].split()[0])
    assert abs(achieved - 0.3) < 0.01
    assert "MLP widths rounded to multiples of 8:" in printed
    assert main(["inspect", str(out), "--plot", str(tmp_path / "alloc.png")]) == 0
    assert (tmp_path / "alloc.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "criterion magnitude" in text and "layer" in text
    assert "MLP widths rounded to multiples of 8:" in text
    assert len([line for line in text.splitlines() if line.strip()[:1].isdigit()]) == 4


def test_replaying_a_saved_plan_gives_the_same_plan(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["prune", "--model", "tiny-llava", "--sparsity", "0.4", "--out", str(first), "--quiet"]) == 0
    assert main(["prune", "--model", "tiny-llava", "--sparsity", "0.4", "--plan", str(first / "hipp_plan.json"),
                 "--out", str(second), "--quiet"]) == 0
    assert (first / "hipp_plan.json").read_text() == (second / "hipp_plan.json").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--sparsity", "0.2", "--criterion", "snip"], "unknown criterion 'snip'"),
        (["--sparsity", "0.2", "--allocation", "owls"], "unknown allocation 'owls'"),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, capsys, args, message):
    code = main(["prune", "--model", "tiny-llava", *args, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and err[-1].startswith("hipp: error:")


def test_unknown_model_path_says_what_was_tried(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["prune", "--model", str(missing), "--sparsity", "0.2", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "built-in names" in err and "does not exist" in err


def test_inspect_refuses_a_directory_without_plan(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a HiPP-Prune export" in capsys.readouterr().err


def test_existing_output_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["prune", "--model", "tiny-llava", "--sparsity", "0.2", "--out", str(out), "--quiet"]) == 2
    assert (out / "keep.txt").read_text() == "precious"
