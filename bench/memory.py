"""Peak memory of ``hipp prune`` against the size of the checkpoint it prunes.

A random-weight LLaVA-shaped model of about 1.5B parameters is built by stock transformers and saved in bf16
(``tests/stock_checkpoints.py``, nothing of the project), then pruned at 30% on the CPU by the ``hipp prune``
command in a child process, whose peak resident memory (``ru_maxrss``, file-backed pages included) is read
when it exits. Target: at most 1.5x the checkpoint's bytes on disk, with an export smaller than the source in
the source's dtype.

    python -m bench.memory                       # 1.5B, bf16, 30%
    python -m bench.memory --shape llava --dtype float16   # the tiny shape, a quick check of the harness
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import markdown_table, write_report

ROOT = Path(__file__).resolve().parent.parent
BUILDER = ROOT / "tests" / "stock_checkpoints.py"
TARGET_RATIO = 1.5


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run_measured(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, stderr tail) of ``cmd`` run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr[-2000:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest of the waited-for children: run one measured child per call.
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak_kib * 1024, seconds, (stdout + stderr)[-500:]


def export_dtypes(path: Path) -> list[str]:
    from safetensors import safe_open

    dtypes: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    return sorted(dtypes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5b", choices=("llava-1.5b", "llava"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        source, out = Path(tmp) / "source", Path(tmp) / "pruned"
        print(f"building {args.shape} in {args.dtype} with stock transformers ...", flush=True)
        build = subprocess.run([sys.executable, "-I", str(BUILDER), args.shape, str(source), args.dtype],
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise SystemExit(build.stderr[-2000:])
        config = json.loads((source / "config.json").read_text())
        load_before = os.getloadavg()
        print("pruning with hipp prune in a child process ...", flush=True)
        peak, seconds, tail = run_measured(
            [sys.executable, "-m", "worker.cli", "prune", "--model", str(source), "--sparsity", str(args.sparsity),
             "--calibration-samples", str(args.calibration_samples), "--out", str(out), "--quiet"]
        )
        load_after = os.getloadavg()
        plan = json.loads((out / "metrics.json").read_text())["plan"]
        source_bytes, export_bytes = weight_bytes(source), weight_bytes(out)
        result: dict[str, Any] = {
            "shape": args.shape,
            "source_dtype": args.dtype,
            "parameters": plan["total_parameters"],
            "sparsity": plan["sparsity"],
            "checkpoint_bytes": source_bytes,
            "export_bytes": export_bytes,
            "export_dtypes": export_dtypes(out),
            "export_config_dtype": json.loads((out / "config.json").read_text()).get("dtype"),
            "peak_rss_bytes": peak,
            "peak_over_checkpoint": peak / source_bytes,
            "target_peak_over_checkpoint": TARGET_RATIO,
            "meets_target": peak / source_bytes <= TARGET_RATIO and export_bytes < source_bytes,
            "prune_seconds": seconds,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "text_config": {k: config["text_config"].get(k) for k in
                            ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                             "vocab_size")},
            "cli_tail": tail.strip().splitlines()[-1] if tail.strip() else "",
        }
    gb = 1e9
    rows = [[args.shape, f"{result['parameters'] / 1e9:.2f}B", args.dtype, f"{source_bytes / gb:.2f}",
             f"{export_bytes / gb:.2f}", ",".join(result["export_dtypes"]), f"{peak / gb:.2f}",
             round(result["peak_over_checkpoint"], 3), TARGET_RATIO, round(seconds, 1),
             f"{load_before[0]:.2f}"]]
    table = markdown_table(
        ["model", "params", "dtype", "checkpoint GB", "export GB", "export dtype", "peak RSS GB",
         "peak / checkpoint", "target", "prune s", "load avg (1 min) before"], rows)
    write_report("memory", result, table)


if __name__ == "__main__":
    main()
