"""Shared output for benchmarks: JSON + a short markdown table + the reproducing command."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def commit(root: Path | None = None) -> str:
    """The checkout's commit (``-dirty`` when tracked files differ from it): the design a result measures.
    Files under ``bench/results`` are results, not design: a benchmark writing its JSON (or the protocol
    ledger) while another runs in the same checkout does not change what that one measures."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, data: dict[str, Any], markdown: str, out_dir: Path | None = None,
                 module: str | None = None) -> Path:
    out = out_dir or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m bench.{module or name} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    data = {"command": command.strip(), "commit": commit(), "machine": machine(), **data}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(f"# bench/{name}\n\n{markdown}\n\nReproduce: `{command.strip()}`\n"
                                    f"Machine: {data['machine']}\n")
    print(markdown)
    print(f"\nwrote {out / (name + '.json')}; reproduce with: {command.strip()}")
    return out
