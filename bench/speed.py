"""Dense vs pruned speed of a LLaVA-shaped random-weight model (100-300M parameters).

For uniform Wanda-sp plans at 20/30/50% of the LM decoder: prefill and per-token decode latency, parameters,
checkpoint bytes, and the measured speedup divided by the FLOP-ideal speedup, all measured in one run with
the models interleaved (machines are noisy; only ratios within a run are compared).

    python -m bench.speed                 # CPU, ~230M parameters
    python -m bench.speed --device cuda --size 7b --dtype bfloat16   # a GPU, 7B-shaped
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import markdown_table, write_report
from worker.hipp.adapters import get_adapter
from worker.hipp.builtin import TinyLlavaSpec, build_tiny_llava
from worker.hipp.calibration import iter_batches, synthetic_samples
from worker.hipp.checkpoint import export_pruned
from worker.hipp.loading import LoadedModel, resolve_dtype
from worker.hipp.plan import PruningPlan
from worker.hipp.pruner import build_plan
from worker.hipp.surgery import apply_plan

SIZES = {
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


@torch.no_grad()
def time_prefill(model: Any, batch: dict[str, torch.Tensor], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    model(**batch, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_decode(model: Any, batch: dict[str, torch.Tensor], device: str, tokens: int) -> float:
    """Seconds per generated token after the prefill, with the KV cache."""
    out = model(**batch, use_cache=True, logits_to_keep=1)
    cache = out.cache
    next_id = out.logits[:, -1:].argmax(-1)
    mask = batch["attention_mask"]
    sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=next_id, attention_mask=mask, cache=cache, use_cache=True)
        cache = out.cache
        next_id = out.logits[:, -1:].argmax(-1)
    sync(device)
    return (time.perf_counter() - start) / tokens


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
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-words", type=int, default=120, help="question length (words) after the image")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mlp-multiple", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-export", action="store_true", help="skip checkpoint sizes (saves disk and time)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    spec = SIZES[args.size]

    dense_model, processor = build_tiny_llava(spec, device=args.device)
    dense_model.to(dtype=dtype)
    loaded = LoadedModel(dense_model, processor, get_adapter(dense_model), f"random-{args.size}")
    question = " ".join(["what colour is the circle on the left of the image ?"] * (args.text_words // 11 + 1))
    samples = [s.__class__(s.image, question) for s in synthetic_samples(args.batch, seed=0, size=spec.image_size)]
    batch = next(iter_batches(loaded, samples, batch_size=args.batch, max_length=None))
    seq = int(batch["input_ids"].shape[1])
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

    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    for model, _ in models.values():  # warm-up
        time_prefill(model, batch, args.device)
        time_decode(model, batch, args.device, 2)
    for _ in range(args.repeats):  # interleaved, so drift hits every model alike
        for name, (model, _) in models.items():
            prefill[name].append(time_prefill(model, batch, args.device))
            decode[name].append(time_decode(model, batch, args.device, args.decode_tokens))

    rows, records = [], []
    dense_prefill, dense_decode = statistics.median(prefill["dense"]), statistics.median(decode["dense"])
    dense_flops = ideal_flops(dense_plan, dense_model, seq, patches, seq + args.decode_tokens // 2)
    for name, (model, plan) in models.items():
        p, d = statistics.median(prefill[name]), statistics.median(decode[name])
        flops = ideal_flops(plan, model, seq, patches, seq + args.decode_tokens // 2)
        ideal_p, ideal_d = dense_flops[0] / flops[0], dense_flops[1] / flops[1]
        speed_p, speed_d = dense_prefill / p, dense_decode / d
        params = sum(t.numel() for t in model.parameters())
        ckpt = checkpoint_bytes(model, processor, plan) if not args.no_export else None
        record = {
            "model": name, "sparsity": plan.sparsity, "parameters": params, "checkpoint_bytes": ckpt,
            "prefill_ms": 1000 * p, "decode_ms_per_token": 1000 * d,
            "prefill_speedup": speed_p, "prefill_ideal_speedup": ideal_p,
            "prefill_fraction_of_ideal": speed_p / ideal_p,
            "decode_speedup": speed_d, "decode_ideal_speedup": ideal_d, "decode_fraction_of_ideal": speed_d / ideal_d,
        }
        records.append(record)
        rows.append([name, round(plan.sparsity, 4), f"{params / 1e6:.1f}M",
                     f"{ckpt / 1e6:.0f} MB" if ckpt else "-", round(1000 * p, 1), round(1000 * d, 2),
                     f"{speed_p:.2f}x / {ideal_p:.2f}x = {speed_p / ideal_p:.2f}",
                     f"{speed_d:.2f}x / {ideal_d:.2f}x = {speed_d / ideal_d:.2f}"])
    header = ["model", "LM sparsity", "params", "checkpoint", "prefill ms", "decode ms/tok",
              "prefill speedup / ideal", "decode speedup / ideal"]
    md = (f"LLaVA-shaped random weights ({args.size}), {args.device} {args.dtype}, batch {args.batch}, "
          f"prompt {seq} tokens, {args.decode_tokens} decode tokens, median of {args.repeats}, "
          f"MLP widths rounded to {args.mlp_multiple}\n\n" + markdown_table(header, rows))
    write_report("speed" if args.out is None or args.size == "230m" else f"speed_{args.size}",
                 {"size": args.size, "device": args.device, "dtype": args.dtype, "prompt_tokens": seq,
                  "results": records}, md, args.out, module="speed")


def checkpoint_bytes(model: Any, processor: Any, plan: PruningPlan) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        export_pruned(model, processor, get_adapter(model), tmp, plan=plan)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


if __name__ == "__main__":
    main()
