"""MLP widths rounded to 1/8/64/128: how fast a pruned MLP's up and down projections run on this device.

For the MLP shapes of the 230m testbed-sized model (hidden 1024, intermediate 2816) and of LLaVA-1.5-7B (4096,
11008), at batch 1 (decode-like GEMV) and batch 16, and for pruned widths at several kept fractions, it times
``linear(x, W_up)`` (hidden -> width) and ``linear(h, W_down)`` (width -> hidden) with the width rounded to each
multiple. The unrounded width is made odd (the worst case for alignment). The widths differ by a few channels,
so cells are compared by throughput (channels per second) relative to the unrounded width; a multiple that
buys nothing shows ratios near 1.00. All cells are timed in one run, threads pinned, the load average written
down; the multiples of one width are timed back to back and compared sample by sample (a burst of other work on
the machine hits them alike), and only ratios within the run are compared. Its pick is what
``worker/hipp/pruning/rounding.py`` (``DEFAULT_MLP_MULTIPLES``) records per device.

    python -m bench.rounding                                   # CPU, float32, < 2 minutes
    python -m bench.rounding --device cuda --dtype bfloat16    # a GPU

On a CPU shared with other work, ``--threads 1`` is steadier: with two OpenMP threads a call waits for a
descheduled sibling, and medians were 20x the best sample in such a run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.report import markdown_table, write_report
from worker.hipp.models.loading import resolve_dtype
from worker.hipp.pruning.layer_counts import round_channels

SHAPES = {"230m": (1024, 2816), "7b": (4096, 11008)}  # (hidden, intermediate): bench/speed.py's SIZES
MULTIPLES = (1, 8, 64, 128)
# A multiple within this fraction of the best throughput counts as "as fast" (the run's noise on a quiet CPU).
TIE = 0.03


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def odd_width(intermediate: int, keep: float) -> int:
    return round(keep * intermediate) | 1


def make_weight(hidden: int, width: int, projection: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """An nn.Linear-layout weight: up is [width, hidden] (hidden -> width), down is [hidden, width]."""
    gen = torch.Generator().manual_seed(width * 2 + (projection == "up"))
    fan_in, fan_out = (hidden, width) if projection == "up" else (width, hidden)
    return (torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in)).to(device, dtype)


def make_cell(weight: torch.Tensor, batch: int) -> Callable[[], torch.Tensor]:
    """A closure running the projection ``weight`` on a batch of ``batch`` tokens."""
    x = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(batch)).to(weight)
    return lambda: torch.nn.functional.linear(x, weight)


def time_cell(run: Callable[[], torch.Tensor], inner: int, device: str) -> float:
    """Seconds per call, over ``inner`` back-to-back calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        run()
    sync(device)
    return (time.perf_counter() - start) / inner


def calls_for(run: Callable[[], torch.Tensor], device: str, target_s: float) -> tuple[int, float]:
    """(calls per sample, seconds per sample): back-to-back calls that take about ``target_s`` (timer resolution
    and launch noise averaged out), at least one."""
    run()
    single = time_cell(run, 3, device)
    inner = max(1, min(10_000, round(target_s / max(single, 1e-7))))
    return inner, inner * single


def pick(throughput_ratio: dict[int, float]) -> int:
    """The smallest multiple within ``TIE`` of the fastest (small multiples leave the allocator more freedom)."""
    best = max(throughput_ratio.values())
    return min(m for m, r in throughput_ratio.items() if r >= best * (1 - TIE))


Group = tuple[str, int, float, str]  # (MLP shape, batch, kept fraction, projection): one comparison of multiples
Cell = tuple[int, Callable[[], torch.Tensor], int, float]  # (width, the call, calls per sample, seconds per sample)


def build_groups(shapes: list[str], batches: list[int], keeps: list[float], multiples: list[int], device: str,
                 dtype: torch.dtype, cell_s: float) -> dict[Group, dict[int, Cell]]:
    groups: dict[Group, dict[int, Cell]] = {}
    for shape in shapes:
        hidden, intermediate = SHAPES[shape]
        for keep in keeps:
            base = odd_width(intermediate, keep)
            for m in multiples:
                width = round_channels(base, intermediate, m)
                for projection in ("up", "down"):
                    weight = make_weight(hidden, width, projection, device, dtype)
                    for batch in batches:
                        run = make_cell(weight, batch)
                        groups.setdefault((shape, batch, keep, projection), {})[m] = (
                            width, run, *calls_for(run, device, cell_s))
    return groups


def measure(groups: dict[Group, dict[int, Cell]], group_s: float, device: str,
            bounds: tuple[int, int] = (5, 200)) -> dict[Group, dict[int, list[float]]]:
    """Seconds per call of every cell. A group's multiples are timed back to back (in an order rotated every
    round), so a burst of other work hits them alike and their ratio survives it; each group gets about
    ``group_s`` seconds of samples (within ``bounds``), and the groups are interleaved round by round."""
    seconds: dict[Group, dict[int, list[float]]] = {g: {m: [] for m in cells} for g, cells in groups.items()}
    rounds = {g: min(max(round(group_s / sum(c[3] for c in cells.values())), bounds[0]), bounds[1])
              for g, cells in groups.items()}
    for r in range(max(rounds.values())):
        for group, cells in groups.items():
            if r >= rounds[group]:
                continue
            order = list(cells)
            for m in order[r % len(order):] + order[: r % len(order)]:
                _, run, inner, _ = cells[m]
                seconds[group][m].append(time_cell(run, inner, device))
    return seconds


def paired_ratio(cells: dict[int, Cell], seconds: dict[int, list[float]], m: int) -> float:
    """Median over repeats of the throughput (channels per second) at multiple ``m`` vs multiple 1."""
    w1, wm = cells[1][0], cells[m][0]
    return statistics.median((wm / tm) / (w1 / t1) for t1, tm in zip(seconds[1], seconds[m], strict=True))


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def cell_records(groups: dict[Group, dict[int, Cell]],
                 seconds: dict[Group, dict[int, list[float]]]) -> list[dict[str, Any]]:
    """One record per cell: its width, samples, best and median seconds, and the paired throughput ratio."""
    records = []
    for group, cells in groups.items():
        shape, batch, keep, projection = group
        for m, (width, _, inner, _) in cells.items():
            best = min(seconds[group][m])
            records.append({"shape": shape, "batch": batch, "keep": keep, "projection": projection, "multiple": m,
                            "width": width, "calls_per_sample": inner, "samples": len(seconds[group][m]),
                            "best_seconds": best, "median_seconds": statistics.median(seconds[group][m]),
                            "best_gflops": 2 * batch * SHAPES[shape][0] * width / best / 1e9,
                            "throughput_vs_unrounded": paired_ratio(cells, seconds[group], m)})
    return records


def summarize(records: list[dict[str, Any]], shapes: list[str], batches: list[int],
              multiples: list[int]) -> tuple[list[list[Any]], dict[str, int], int]:
    """(table rows, the pick per shape and batch, the pick over all of them)."""
    rows: list[list[Any]] = []
    picks: dict[str, int] = {}
    ratios: dict[tuple[str, int, int], float] = {}
    for shape in shapes:
        for batch in batches:
            for m in multiples:
                cell = [r for r in records if (r["shape"], r["batch"], r["multiple"]) == (shape, batch, m)]
                spread = [float(r["throughput_vs_unrounded"]) for r in cell]
                ratios[(shape, batch, m)] = geometric_mean(spread)
                rows.append([shape, batch, m, ", ".join(str(r["width"]) for r in cell if r["projection"] == "up"),
                             round(statistics.mean(float(r["best_gflops"]) for r in cell), 1),
                             f"{ratios[(shape, batch, m)]:.3f}", f"{min(spread):.2f}..{max(spread):.2f}"])
            picks[f"{shape}/batch{batch}"] = pick({m: ratios[(shape, batch, m)] for m in multiples})
    overall = pick({m: geometric_mean([ratios[(shape, batch, m)] for shape in shapes for batch in batches])
                    for m in multiples})
    return rows, picks, overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shapes", default="230m,7b", help=f"MLP shapes: {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--keeps", default="0.5,0.7", help="kept fractions of the MLP width")
    parser.add_argument("--multiples", default=",".join(map(str, MULTIPLES)), help="must include 1")
    parser.add_argument("--group-seconds", type=float, default=2.5,
                        help="time spent sampling each (shape, batch, width, projection) group")
    parser.add_argument("--cell-ms", type=float, default=1.0, help="time per sample of one cell")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, pinned to the first N cores")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(min(args.threads, os.cpu_count() or 1))))
    shapes = args.shapes.split(",")
    multiples = [int(m) for m in args.multiples.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    keeps = [float(k) for k in args.keeps.split(",")]
    load_before = os.getloadavg()
    groups = build_groups(shapes, batches, keeps, multiples, args.device, resolve_dtype(args.dtype),
                          args.cell_ms / 1000)
    seconds = measure(groups, args.group_seconds, args.device)
    load_after = os.getloadavg()

    records = cell_records(groups, seconds)
    rows, picks, overall = summarize(records, shapes, batches, multiples)
    header = ["MLP shape", "batch", "multiple", "widths", "mean best GFLOP/s", "throughput vs unrounded",
              "range over widths and projections"]
    md = (f"Pruned MLP projections (up: hidden -> width, down: width -> hidden) on {args.device} {args.dtype}, "
          f"{args.threads} thread(s) pinned, kept fractions {keeps} of the intermediate width (the unrounded width "
          f"made odd), widths rounded to {multiples}. Samples of at least one call and about {args.cell_ms:g} ms, "
          f"{args.group_seconds:g} s of them per width and projection (5 to 200 per cell); a width's multiples "
          f"timed back to back, in an order rotated every round, all cells in one run. "
          f"Throughput vs unrounded: channels per second relative to the odd width, the median over samples of "
          f"the paired ratio, then the geometric mean over widths and projections. Load average (1, 5, 15 min) "
          f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}."
          f"\n\n" + markdown_table(header, rows)
          + f"\n\nSmallest multiple within {TIE:.0%} of the fastest: "
          + ", ".join(f"{k} -> {v}" for k, v in picks.items())
          + f"; over all of them (geometric mean of the throughput ratios): {overall}.")
    kind = args.device.split(":")[0]
    write_report("rounding" if kind == "cpu" else f"rounding_{kind}",
                 {"device": args.device, "dtype": args.dtype, "threads": args.threads, "multiples": multiples,
                  "keeps": keeps, "tie": TIE, "load_average_before": load_before, "load_average_after": load_after,
                  "picks": picks, "pick": overall, "results": records},
                 md, args.out, module="rounding")


if __name__ == "__main__":
    main()
