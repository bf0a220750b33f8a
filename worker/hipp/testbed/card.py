"""The testbed model card: evaluates the exported model on the documented held-out benchmark files and writes
``metrics.json`` and ``README.md`` next to the weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from worker.hipp.evaluation.runner import evaluate
from worker.hipp.evaluation.tasks.pope import SPLITS
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.testbed.data import DEFAULT_SEED, POPE_IMAGES, SQA_SIZES, write_benchmarks


def measure(model_dir: Path, report: Reporter = SILENT) -> dict[str, Any]:
    """Dense metrics on the full documented test data (3,000 POPE questions per split, SQA test split)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).float().eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_benchmarks(data, DEFAULT_SEED, POPE_IMAGES, {"test": SQA_SIZES["test"]}, report)
        return evaluate(model, processor, data / "pope", data / "scienceqa", batch_size=64, report=report)


def _weights(weights: dict[str, float] | None) -> str:
    return " / ".join(f"{k} {v:g}" for k, v in (weights or {}).items()) or "equally"


def render_card(metrics: dict[str, Any], training: dict[str, Any], command: str, notes: str = "",
                reference: str = "testbed", trained_on: str | None = None) -> str:
    pope = metrics["pope"]
    sqa = metrics["scienceqa"]
    rows = "\n".join(
        f"| {s} | {pope[s]['n']} | {pope[s]['balanced_accuracy']:.3f} (+/- {pope[s]['balanced_accuracy_se']:.3f}) "
        f"| {pope[s]['accuracy']:.3f} | {pope[s]['f1']:.3f} | {pope[s]['yes_ratio']:.3f} |"
        for s in SPLITS
    )
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sqa["by_kind"].items())
    cfg = training.get("config", {})
    layers = cfg.get("text_layers", 6)
    where = trained_on or f"2 CPU cores ({cfg.get('threads', 1)} torch thread)"
    command_block = "\n".join("    " + line for line in command.strip().splitlines())
    return f"""# HiPP-Prune testbed VLM

A small LLaVA (CLIP-style ViT 64 px, patch 16, 4 layers, width 128 -> 17 image tokens including the class token;
2-layer GELU projector; Llama decoder with {layers} layers, width 128, 8 query heads / 4 KV heads, MLP 384; word-level
vocabulary) trained from scratch on the project's synthetic world so that pruning can be measured honestly.
It is the model reference `{reference}`. Weights are fp16 safetensors; load with
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` (offline).

## Training

{command_block}

{notes}

- seed: {cfg.get('seed', 0)}
- trained on: {where}; wall time {training.get('minutes', '?')} minutes, data generation and both stages
  included
- stage 1 (vision tower alone with auxiliary heads: per-patch coverage, presence, per-category count and side):
  {training.get('stage1_steps', '?')} steps of batch {cfg.get('batch')}, lr {cfg.get('stage1_lr')},
  {cfg.get('stage1_minutes')} minutes
- stage 2 (full LLaVA, single-turn QA, every answer token supervised; auxiliary losses: vision heads
  x{cfg.get('aux_weight')}, word/image alignment x{cfg.get('align_weight')}, name-token probe
  x{cfg.get('probe_weight')} at decoder layer {cfg.get('probe_layer')}, option-correctness probe
  x{cfg.get('option_weight')} at decoder layer {cfg.get('option_layer')}; vision lr x{cfg.get('vision_lr_scale')}):
  {training.get('val', {}).get('steps', '?')} steps of batch {cfg.get('batch')}, lr {cfg.get('stage2_lr')},
  {cfg.get('stage2_minutes')} minutes; ScienceQA share {cfg.get('sqa_share')}, kinds weighted
  {_weights(cfg.get('sqa_kind_weights'))}
- training data: {cfg.get('pope_images')} world images for POPE-style questions + {cfg.get('sqa_problems')}
  ScienceQA-style problems (kinds presence / count / side in equal shares), generated from the seed.

Stage budgets are wall-clock minutes (the CPUs are shared), so the step counts above are what this run reached;
rerunning the command gives the same data and initialisation, and a schedule over the same minutes.

## Metrics (held-out images, logit scoring)

Benchmark files: `hipp testbed data --out DIR` (data seed {DEFAULT_SEED}); evaluate with
`hipp eval --model {reference} --pope DIR/pope --sqa DIR/scienceqa`.

| POPE split | questions | balanced accuracy | accuracy | F1 | yes-ratio |
|---|---|---|---|---|---|
{rows}

ScienceQA-format test: accuracy {sqa['accuracy']:.3f} (+/- {sqa['accuracy_se']:.3f}) on {sqa['n']} problems
({kinds}).

Exact numbers: `metrics.json`.
"""


def write_card(
    model_dir: Path, training: dict[str, Any], command: str, notes: str = "", report: Reporter = SILENT,
    reference: str = "testbed", trained_on: str | None = None,
) -> dict[str, Any]:
    """Measure the model in ``model_dir`` and write metrics.json and README.md there."""
    metrics = measure(model_dir, report)
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (model_dir / "README.md").write_text(render_card(metrics, training, command, notes, reference, trained_on))
    return metrics
