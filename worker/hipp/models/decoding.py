"""Decoding that turns removed parameters into time, and the latency every job records.

Eager decoding of a 7B model on a GPU is bound by kernel launches, not by the weights it reads, so a pruned
model decodes barely faster than the dense one. The fast path is a static KV cache with CUDA graphs
(``torch.compile``'s reduce-overhead mode through transformers' ``generate``). Per-layer-shaped exports need
nothing special: each layer of transformers' static cache takes its head count from its own keys.

    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype="auto").cuda()
    out = model.generate(**inputs, max_new_tokens=64, cache_implementation="static")  # compiled on CUDA

:func:`measure_latency` times prefill and per-token decode of a fixed prompt; :func:`latency_report` sets the
dense and pruned figures side by side with the speedup a parameter-bound model would get.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: New tokens timed per decode measurement; the first is excluded (it is the prefill's).
DECODE_TOKENS = 16
REPEATS = 3


@dataclass(frozen=True)
class DecodeOptions:
    """How to generate. ``compile=None`` compiles on CUDA only (CUDA graphs pay off there; on a CPU the
    compilation costs more than it saves for the few tokens an evaluation generates)."""

    static_cache: bool = True
    compile: bool | None = None

    def compiles(self, device: torch.device) -> bool:
        return self.static_cache and (self.compile if self.compile is not None else device.type == "cuda")


EAGER = DecodeOptions(static_cache=False, compile=False)


def generation_kwargs(model: Any, options: DecodeOptions) -> dict[str, Any]:
    """``generate`` arguments for ``options`` on ``model``'s device."""
    if not options.static_cache:
        return {}
    from transformers import CompileConfig

    if not options.compiles(model.device):
        return {"cache_implementation": "static", "disable_compile": True}
    config = CompileConfig(mode="reduce-overhead" if model.device.type == "cuda" else "default")
    config._compile_all_devices = True  # type: ignore[assignment]  # CUDA compiles by itself; this allows a CPU
    return {"cache_implementation": "static", "compile_config": config}


@torch.no_grad()
def generate(model: Any, inputs: dict[str, torch.Tensor], *, max_new_tokens: int,
             options: DecodeOptions = DecodeOptions(), **kwargs: Any) -> torch.Tensor:
    """Greedy generation through ``options``' path (prompt and new tokens, like ``model.generate``)."""
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                          **generation_kwargs(model, options), **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Any, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(model: Any, inputs: dict[str, torch.Tensor], *, new_tokens: int = DECODE_TOKENS,
                    repeats: int = REPEATS, options: DecodeOptions = DecodeOptions()) -> dict[str, Any]:
    """Median prefill time and per-token decode time of ``inputs`` (one warm-up first, so compilation and
    cache allocation are not timed). Decode per token = (time for ``new_tokens`` - time for 1) / (new_tokens - 1)."""
    device = model.device

    def run(tokens: int) -> None:
        generate(model, inputs, max_new_tokens=tokens, min_new_tokens=tokens, options=options)

    run(new_tokens)  # warm-up: compilation, cache allocation, allocator growth
    prefill = _median_seconds(lambda: model(**inputs, logits_to_keep=1), device, repeats)
    one = _median_seconds(lambda: run(1), device, repeats)
    full = _median_seconds(lambda: run(new_tokens), device, repeats)
    return {
        "prefill_ms": round(prefill * 1000, 3),
        "decode_ms_per_token": round(max(full - one, 0.0) / (new_tokens - 1) * 1000, 3),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "batch": int(inputs["input_ids"].shape[0]),
        "new_tokens": new_tokens,
        **asdict(options),
        "compiled": options.compiles(device),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def latency_report(dense: dict[str, Any], pruned: dict[str, Any], ideal_speedup: float,
                   device: str) -> dict[str, Any]:
    """Dense and pruned latency side by side; each speedup also as a fraction of ``ideal_speedup`` (the
    dense-over-pruned FLOPs per token: what a parameter-bound model would gain)."""
    def ratio(key: str) -> float | None:
        return round(dense[key] / pruned[key], 4) if pruned.get(key) else None

    speedup = {"prefill": ratio("prefill_ms"), "decode": ratio("decode_ms_per_token")}
    return {
        "device": device,
        "dense": dense,
        "pruned": pruned,
        "speedup": speedup,
        "ideal_speedup": round(ideal_speedup, 4),
        "speedup_over_ideal": {k: (round(v / ideal_speedup, 4) if v is not None else None)
                               for k, v in speedup.items()},
    }

