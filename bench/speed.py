"""Dense vs pruned speed of a LLaVA-shaped random-weight model (100-300M parameters).

For uniform Wanda-sp plans at 20/30/50% of the LM decoder, at batch 1 and 16: prefill and per-token decode
latency through each decode path side by side (eager; static KV cache; static cache compiled with CUDA graphs),
dense decode against the bandwidth floor (decode weight bytes / device bandwidth, both written down), and the
measured speedup divided by the FLOP-ideal speedup, all in one run with the models interleaved and the threads
pinned (machines are noisy; only ratios within a run are compared; the load average is written down).

    python -m bench.speed                 # CPU, ~230M parameters
    python -m bench.speed --device cuda --size 7b --dtype bfloat16   # a GPU, 7B-shaped
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import markdown_table, write_report
from worker.hipp.checkpoint.export import export_pruned
from worker.hipp.data.calibration import iter_batches, synthetic_samples
from worker.hipp.models.adapters import get_adapter
from worker.hipp.models.builtin_llava import TinyLlavaSpec, build_tiny_llava
from worker.hipp.models.decoding import EAGER, DecodeOptions, generate
from worker.hipp.models.loading import LoadedModel, resolve_dtype
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan

SIZES = {
    # The built-in tiny LLaVA: a smoke test of the harness in seconds.
    "tiny": TinyLlavaSpec(),
    # ~230M parameters: Llama-like decoder of 12 layers at d=1024, a small CLIP tower.
    "230m": TinyLlavaSpec(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=16, intermediate_size=2816,
                          vision_hidden=256, vision_layers=4, vision_heads=4, vision_intermediate=1024,
                          image_size=112, patch_size=14, vocab_size=32000),
    # LLaVA-1.5-7B decoder shapes (vision tower kept small: only the decoder is pruned).
    "7b": TinyLlavaSpec(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                        vision_hidden=1024, vision_layers=4, vision_heads=16, vision_intermediate=4096,
                        image_size=336, patch_size=14, vocab_size=32000),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PATHS = {"eager": EAGER, "static": DecodeOptions(static_cache=True, compile=False),
         "compiled": DecodeOptions(static_cache=True, compile=True)}


@torch.no_grad()
def time_prefill(model: Any, batch: dict[str, torch.Tensor], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    model(**batch, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_decode(model: Any, batch: dict[str, torch.Tensor], device: str, tokens: int,
                options: DecodeOptions = EAGER) -> float:
    """Seconds per generated token after the prefill: (generate ``tokens`` - generate 1) / (tokens - 1), through
    ``options``' path (the one users get from ``generate``)."""
    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        generate(model, batch, max_new_tokens=n, min_new_tokens=n, options=options)
        sync(device)
        return time.perf_counter() - start

    return max(run(tokens) - run(1), 0.0) / (tokens - 1)


def measure_bandwidth(device: str, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large on-device copy (read + write), the best of ``repeats``."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def decode_weight_bytes(model: Any) -> int:
    """Bytes of the weights one decode step reads: the language model and its head (not the vision tower)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "vision_tower" not in n and "projector" not in n and "embed_tokens" not in n)


def vision_flops(model: Any, patches: int) -> int:
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n)
    return 2 * vision * patches


def ideal_flops(plan: PruningPlan, model: Any, seq: int, patches: int, decode_context: int) -> tuple[float, float]:
    """(prefill FLOPs, decode FLOPs per token) from the plan's accounting plus the unpruned parts."""
    cfg = model.config.text_config
    head = 2 * cfg.hidden_size * cfg.vocab_size
    prefill = seq * plan.decoder_flops_per_token(context=seq // 2) + head + vision_flops(model, patches)
    decode = plan.decoder_flops_per_token(context=decode_context) + head
    return float(prefill), float(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="230m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sparsities", default="0.2,0.3,0.5")
    parser.add_argument("--batches", default="1,16", help="batch sizes, each measured in this run")
    parser.add_argument("--paths", default=None,
                        help="decode paths side by side: eager, static, compiled (default: eager,compiled on CUDA, "
                             "eager,static on a CPU)")
    parser.add_argument("--text-words", type=int, default=120, help="question length (words) after the image")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mlp-multiple", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, pinned to the first N cores")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="device memory bandwidth in GB/s (default: measured with a large copy)")
    parser.add_argument("--no-export", action="store_true", help="skip checkpoint sizes (saves disk and time)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(min(args.threads, os.cpu_count() or 1))))
    dtype = resolve_dtype(args.dtype)
    spec = SIZES[args.size]
    paths = (args.paths or ("eager,compiled" if args.device.startswith("cuda") else "eager,static")).split(",")
    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()

    dense_model, processor = build_tiny_llava(spec, device=args.device)
    dense_model.to(dtype=dtype)
    loaded = LoadedModel(dense_model, processor, get_adapter(dense_model), f"random-{args.size}")
    question = " ".join(["what colour is the circle on the left of the image ?"] * (args.text_words // 11 + 1))
    inputs = {}
    for b in batches:
        samples = [s.__class__(s.image, question) for s in synthetic_samples(b, seed=0, size=spec.image_size)]
        inputs[b] = dict(next(iter_batches(loaded, samples, batch_size=b, max_length=None)))
    seq = int(inputs[batches[0]]["input_ids"].shape[1])
    patches = (spec.image_size // spec.patch_size) ** 2

    models: dict[str, tuple[Any, PruningPlan]] = {}
    dense_plan = PruningPlan.dense(build_plan(loaded, 0.0, "magnitude").geometry)
    models["dense"] = (dense_model, dense_plan)
    calib = synthetic_samples(8, seed=1, size=spec.image_size)
    for s in [float(x) for x in args.sparsities.split(",")]:
        plan = build_plan(loaded, s, "wanda-sp", "uniform", mlp_multiple=args.mlp_multiple, samples=calib)
        pruned = copy.deepcopy(dense_model)
        apply_plan(get_adapter(pruned), plan)
        models[f"{s:.0%}"] = (pruned, plan)

    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth(args.device)
    cells = [(b, path) for b in batches for path in paths]
    prefill: dict[tuple[str, int], list[float]] = {(m, b): [] for m in models for b in batches}
    decode: dict[tuple[str, int, str], list[float]] = {(m, b, p): [] for m in models for b, p in cells}
    for model, _ in models.values():  # warm-up: compilation, cache allocation
        for b, path in cells:
            time_prefill(model, inputs[b], args.device)
            time_decode(model, inputs[b], args.device, 3, PATHS[path])
    for _ in range(args.repeats):  # interleaved, so drift hits every model alike
        for name, (model, _) in models.items():
            for b in batches:
                prefill[(name, b)].append(time_prefill(model, inputs[b], args.device))
            for b, path in cells:
                decode[(name, b, path)].append(time_decode(model, inputs[b], args.device, args.decode_tokens,
                                                           PATHS[path]))
    load_after = os.getloadavg()

    rows, records = [], []
    dense_flops = ideal_flops(dense_plan, dense_model, seq, patches, seq + args.decode_tokens // 2)
    dense_bytes = decode_weight_bytes(dense_model)
    floor_s = dense_bytes / bandwidth  # one decode step cannot be faster than reading the weights once
    for b, path in cells:
        dense_p = statistics.median(prefill[("dense", b)])
        dense_d = statistics.median(decode[("dense", b, path)])
        for name, (model, plan) in models.items():
            p, d = statistics.median(prefill[(name, b)]), statistics.median(decode[(name, b, path)])
            flops = ideal_flops(plan, model, seq, patches, seq + args.decode_tokens // 2)
            ideal_p, ideal_d = dense_flops[0] / flops[0], dense_flops[1] / flops[1]
            speed_p, speed_d = dense_p / p, dense_d / d
            params = sum(t.numel() for t in model.parameters())
            record = {
                "model": name, "batch": b, "path": path, "sparsity": plan.sparsity, "parameters": params,
                "prefill_ms": 1000 * p, "decode_ms_per_token": 1000 * d, "decode_tokens_per_s": b / d,
                "prefill_speedup": speed_p, "prefill_ideal_speedup": ideal_p,
                "prefill_fraction_of_ideal": speed_p / ideal_p,
                "decode_speedup": speed_d, "decode_ideal_speedup": ideal_d,
                "decode_fraction_of_ideal": speed_d / ideal_d,
                "decode_step_over_bandwidth_floor": (floor_s * decode_weight_bytes(model) / dense_bytes) / d,
            }
            records.append(record)
            rows.append([name, b, path, round(plan.sparsity, 4), f"{params / 1e6:.1f}M", round(1000 * p, 1),
                         round(1000 * d, 2), round(b / d, 1), f"{record['decode_step_over_bandwidth_floor']:.2f}",
                         f"{speed_p:.2f}x / {ideal_p:.2f}x = {speed_p / ideal_p:.2f}",
                         f"{speed_d:.2f}x / {ideal_d:.2f}x = {speed_d / ideal_d:.2f}"])
    sizes = {name: checkpoint_bytes(model, processor, plan) for name, (model, plan) in models.items()
             } if not args.no_export else {}
    header = ["model", "batch", "decode path", "LM sparsity", "params", "prefill ms", "decode ms/step", "tokens/s",
              "of bandwidth floor", "prefill speedup / ideal", "decode speedup / ideal"]
    md = (f"LLaVA-shaped random weights ({args.size}), {args.device} {args.dtype}, {args.threads} threads pinned, "
          f"prompt {seq} tokens, {args.decode_tokens} decode tokens, median of {args.repeats}, models interleaved, "
          f"MLP widths rounded to {args.mlp_multiple}. Bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({'given' if args.bandwidth_gbs else 'measured: large copy'}); dense decode weights "
          f"{dense_bytes / 1e9:.3f} GB, so the floor is {1000 * floor_s:.2f} ms per decode step. "
          f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}.\n\n" + markdown_table(header, rows))
    if sizes:
        md += "\n\nCheckpoint bytes: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items())
    write_report("speed" if args.out is None or args.size == "230m" else f"speed_{args.size}",
                 {"size": args.size, "device": args.device, "dtype": args.dtype, "prompt_tokens": seq,
                  "threads": args.threads, "bandwidth_bytes_per_s": bandwidth,
                  "bandwidth_source": "given" if args.bandwidth_gbs else "measured",
                  "dense_decode_weight_bytes": dense_bytes, "load_average_before": load_before,
                  "load_average_after": load_after, "checkpoint_bytes": sizes, "results": records},
                 md, args.out, module="speed")


def checkpoint_bytes(model: Any, processor: Any, plan: PruningPlan) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        export_pruned(model, processor, get_adapter(model), tmp, plan=plan)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


if __name__ == "__main__":
    main()
