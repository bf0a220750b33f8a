"""The frozen protocol's ledger (bench/protocol.py): a report seed is fresh, tied to one clean design commit."""

from __future__ import annotations

import json

import pytest

from bench.protocol import DEV_SEED, ProtocolError, claim, read_ledger
from worker.hipp.testbed.data import DEFAULT_SEED


def test_the_development_seed_is_the_one_the_benchmark_files_use():
    assert DEV_SEED == DEFAULT_SEED


def test_a_fresh_seed_is_recorded_with_its_commit_and_reproducible_there(tmp_path):
    ledger = tmp_path / "protocol.json"
    entry = claim(2027, "baselines_report", ledger, design="abc123")
    assert entry["seed"] == 2027 and entry["commit"] == "abc123"
    assert claim(2027, "baselines_report", ledger, design="abc123")["commit"] == "abc123"  # same design: allowed
    assert len(read_ledger(ledger)) == 1
    assert json.loads(ledger.read_text())["dev_seed"] == DEV_SEED


@pytest.mark.parametrize(("seed", "design", "message"), [
    (DEV_SEED, "abc123", "development seed"),
    (2027, "def456", "needs a seed never used before"),
    (31, "abc123-dirty", "not a clean commit"),
    (31, "unknown", "not a clean commit"),
])
def test_seeds_the_protocol_does_not_allow_are_refused(tmp_path, seed, design, message):
    ledger = tmp_path / "protocol.json"
    claim(2027, "baselines_report", ledger, design="abc123")
    with pytest.raises(ProtocolError, match=message):
        claim(seed, "another_report", ledger, design=design)
    assert len(read_ledger(ledger)) == 1  # nothing recorded for a refused claim


def test_a_result_file_written_during_a_run_does_not_make_the_design_dirty(tmp_path):
    import subprocess

    from bench.report import commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "design.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "protocol.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "design")
    clean = commit(tmp_path)
    assert len(clean) == 12 and not clean.endswith("-dirty")
    (tmp_path / "bench" / "results" / "protocol.json").write_text('{"reports": []}\n')  # a claim, another bench
    assert commit(tmp_path) == clean
    (tmp_path / "design.py").write_text("x = 2\n")  # the design itself changed
    assert commit(tmp_path) == clean + "-dirty"
