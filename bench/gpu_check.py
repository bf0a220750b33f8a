"""CUDA correctness at 7B scale with random weights: masks vs surgery, and export -> fresh-process reload.

Runs on a GPU machine (never in CI):

    python -m bench.gpu_check --out DIR

1. LLaVA-1.5-7B decoder shapes (32 layers, d=4096, 32 heads, MLP 11008, vocab 32000), fp32 with TF32 off:
   dense, masked and sliced logits for a uniform Wanda-sp 30% plan (MLP widths rounded to 64).
2. A GQA variant (32 query heads over 8 KV heads, 8 layers, d=4096) in fp32: masked vs sliced, then export and
   reload in a fresh process on the GPU, logits compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.speed import SIZES
from worker.hipp.checkpoint.export import export_pruned
from worker.hipp.data.calibration import iter_batches, synthetic_samples
from worker.hipp.models.adapters import get_adapter
from worker.hipp.models.builtin_llava import build_tiny_llava
from worker.hipp.models.loading import LoadedModel
from worker.hipp.pruning.masking import apply_masks
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan


@torch.no_grad()
def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()


def check(name: str, spec: Any, dtype: torch.dtype, export: bool, device: str = "cuda") -> dict[str, Any]:
    start = time.perf_counter()
    model, processor = build_tiny_llava(spec, device=device)
    model.to(dtype=dtype)
    loaded = LoadedModel(model, processor, get_adapter(model), name)
    samples = synthetic_samples(4, seed=0, size=spec.image_size)
    batch = next(iter_batches(loaded, samples, batch_size=4))
    plan = build_plan(loaded, 0.3, "wanda-sp", mlp_multiple=64, samples=synthetic_samples(8, seed=1,
                                                                                          size=spec.image_size))
    dense = logits(model, batch)
    with apply_masks(loaded.adapter, plan):
        masked = logits(model, batch)
    apply_plan(loaded.adapter, plan)
    sliced = logits(model, batch)
    scale = float(dense.std())
    result: dict[str, Any] = {
        "model": name, "dtype": str(dtype), "parameters_dense": plan.geometry.total_parameters,
        "parameters_pruned": sum(p.numel() for p in model.parameters()), "sparsity": plan.sparsity,
        "logit_std": scale, "max_abs_mask_vs_slice": float((masked - sliced).abs().max()),
        "max_abs_dense_vs_slice": float((dense - sliced).abs().max()),
        "argmax_agreement_mask_vs_slice": float((masked.argmax(-1) == sliced.argmax(-1)).float().mean()),
    }
    if export:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "export"
            export_pruned(model, processor, loaded.adapter, out, plan=plan)
            torch.save({k: v.cpu() for k, v in batch.items()}, Path(tmp) / "batch.pt")
            torch.save(sliced.cpu(), Path(tmp) / "ref.pt")
            code = textwrap.dedent(f"""
                import json, torch
                from transformers import AutoModelForImageTextToText
                m, info = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True,
                    output_loading_info=True, dtype={str(dtype)!r}.split('.')[-1], device_map={device!r})
                b = {{k: v.to({device!r}) for k, v in torch.load({str(Path(tmp) / 'batch.pt')!r}).items()}}
                with torch.no_grad():
                    out = m(**b).logits.float().cpu()
                ref = torch.load({str(Path(tmp) / 'ref.pt')!r})
                print(json.dumps({{"max_abs_reload": float((out - ref).abs().max()),
                                  "missing": len(info["missing_keys"]), "unexpected": len(info["unexpected_keys"]),
                                  "mismatched": len(info["mismatched_keys"])}}))
            """)
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
            lines = run.stdout.strip().splitlines()
            result["reload"] = json.loads(lines[-1]) if run.returncode == 0 and lines else run.stderr[-2000:]
    result["seconds"] = time.perf_counter() - start
    del model, loaded
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = [
        check("llava-7b-shape-fp32", SIZES["7b"], torch.float32, export=False),
        check("gqa-7b-width-8-layers-fp32", replace(SIZES["7b"], num_layers=8, num_kv_heads=8), torch.float32,
              export=True),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                                         "torch": torch.__version__, "results": results}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
