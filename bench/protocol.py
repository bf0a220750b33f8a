"""The frozen protocol's ledger: which world seeds have been looked at, at which design commit.

Everything that tunes (the method, its hyperparameters, the search set, the development test files) uses the
development world seed :data:`DEV_SEED`. A result that is reported as *the* result is produced once on a
fresh world seed, at a commit where the design is frozen: :func:`claim` records that seed with the commit in
``bench/results/protocol.json`` and refuses

- the development seed (it has been tuned on),
- a seed already claimed at another commit (a design change after a report needs a new fresh seed),
- a checkout with uncommitted changes to tracked files outside ``bench/results`` (the report must name the
  design it measured; result files are not design, see :func:`bench.report.commit`).

Re-running the same report at the same commit on its seed is allowed (it reproduces, it does not tune).
docs/method.md ("Frozen protocol") states the rule for people.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from bench.report import RESULTS, commit

DEV_SEED = 1234  # worker.hipp.testbed.data.DEFAULT_SEED: the seed of every benchmark file used so far
LEDGER = RESULTS / "protocol.json"


class ProtocolError(Exception):
    """A report seed that the frozen protocol does not allow."""


def read_ledger(path: Path = LEDGER) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries: list[dict[str, Any]] = json.loads(path.read_text())["reports"]
    return entries


def check(seed: int, design: str, ledger: list[dict[str, Any]]) -> None:
    """Raise :class:`ProtocolError` unless ``seed`` may be reported on at commit ``design``."""
    if seed == DEV_SEED:
        raise ProtocolError(f"world seed {seed} is the development seed (tuned on); report on a fresh one")
    if design == "unknown" or design.endswith("-dirty"):
        raise ProtocolError(f"the checkout is not a clean commit ({design}): commit the design before reporting")
    for entry in ledger:
        if entry["seed"] == seed and entry["commit"] != design:
            raise ProtocolError(
                f"world seed {seed} was reported on at commit {entry['commit']} ({entry['report']}); the design has "
                "changed since, so this report needs a seed never used before")


def claim(seed: int, report: str, path: Path = LEDGER, design: str | None = None) -> dict[str, Any]:
    """Check ``seed`` for ``report`` at the current commit and record it in the ledger; the entry."""
    design = design or commit()
    ledger = read_ledger(path)
    check(seed, design, ledger)
    entry = {"seed": seed, "commit": design, "report": report,
             "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")}
    if not any(e["seed"] == seed and e["commit"] == design and e["report"] == report for e in ledger):
        ledger.append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"dev_seed": DEV_SEED, "reports": ledger}, indent=1) + "\n")
    return entry
