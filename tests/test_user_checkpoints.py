"""Checkpoints as users have them: tiny models built outside the project by stock transformers
(``tests/stock_checkpoints.py``), pruned through the ``hipp`` command, exported and reloaded in a process that
has only torch + transformers (no torchvision in this suite's environment).

- Qwen2.5-VL saved the stock way (untied and tied embeddings) or laid out like the hub, a hub-layout Qwen2-VL and
  a llava-1.5-style LLaVA prune at 30% and 0%; exports load with no missing or unexpected keys; the 0% export's
  logits equal the original's; the 30% export's equal the in-memory pruned model's.
- bf16, fp16 and fp32 sources export in their own dtype, with fewer bytes than the source; large exports come
  as safetensors shards with an index; processor, tokenizer, chat template and generation config carry over
  byte for byte.
- Checkpoints that cannot load fail with one line naming what to fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import calibration_batch
from worker.hipp.checkpoint.export import PLAN_FILE, export_loaded
from worker.hipp.models.loading import load_model
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.surgery import apply_plan

BUILDER = Path(__file__).parent / "stock_checkpoints.py"
QWEN_KINDS = ["qwen2.5-vl-stock", "qwen2.5-vl-stock-tied", "qwen2.5-vl-hub", "qwen2-vl-hub"]
KINDS = [*QWEN_KINDS, "llava"]
WEIGHT_SUFFIXES = (".safetensors",)

# Runs with -I (isolated): the project is not importable, only torch + transformers. Loads the model with
# dtype="auto" (the export's own), runs it on the saved batch, and, when asked, the original checkpoint too.
RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    path, batch_path, out_path, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))  # the test process's count: reductions, and so logits, depend on it
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True, dtype="auto")
    AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    batch = torch.load(batch_path)
    batch = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    torch.save(logits, out_path)
    print(json.dumps({"class": type(model).__name__, "dtype": str(model.dtype),
                      "info": {k: sorted(map(str, v)) for k, v in info.items()},
                      "generated": list(generated.shape)}))
    """
)


def run_isolated(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", *args], capture_output=True, text=True, timeout=timeout)


def build_stock(kind: str, out: Path, dtype: str = "float32") -> Path:
    result = run_isolated(str(BUILDER), kind, str(out), dtype)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def hipp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=600)


def reload(path: Path, batch_path: Path, out: Path) -> dict:
    result = run_isolated("-c", RELOAD, str(path), str(batch_path), str(out), str(torch.get_num_threads()))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def weight_dtypes(path: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    dtypes = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    return dtypes


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stock")
    for kind in KINDS:
        build_stock(kind, root / kind)
    return root


def save_batch(loaded, path: Path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    batch = dict(calibration_batch(loaded, n=2))
    torch.save(batch, path)
    return batch


@pytest.mark.parametrize("kind", KINDS)
def test_stock_checkpoint_prunes_at_30_and_0_percent_and_reloads_plain(kind: str, stock_dir: Path,
                                                                        tmp_path: Path) -> None:
    source = stock_dir / kind
    for sparsity in ("0.3", "0"):
        out = tmp_path / f"pruned-{sparsity}"
        result = hipp("prune", "--model", str(source), "--sparsity", sparsity, "--out", str(out), "--quiet")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr

    # Inputs made by the engine's own processor path (image-only for Qwen here: no torchvision).
    loaded = load_model(str(source))
    batch = save_batch(loaded, tmp_path / "batch.pt")
    with torch.no_grad():
        dense_logits = loaded.model(**batch).logits

    report0 = reload(tmp_path / "pruned-0", tmp_path / "batch.pt", tmp_path / "logits0.pt")
    assert report0["info"]["missing_keys"] == [] and report0["info"]["unexpected_keys"] == []
    assert torch.equal(torch.load(tmp_path / "logits0.pt"), dense_logits)

    plan = PruningPlan.load(tmp_path / "pruned-0.3" / PLAN_FILE)
    assert 0.25 < plan.summary()["sparsity"] < 0.35
    apply_plan(loaded.adapter, plan)
    with torch.no_grad():
        pruned_logits = loaded.model(**batch).logits
    report = reload(tmp_path / "pruned-0.3", tmp_path / "batch.pt", tmp_path / "logits30.pt")
    assert report["info"]["missing_keys"] == [] and report["info"]["unexpected_keys"] == []
    assert report["class"].startswith("Hipp") and report["generated"][1] > batch["input_ids"].shape[1]
    assert torch.equal(torch.load(tmp_path / "logits30.pt"), pruned_logits)
    # The processor files came over unchanged: a user of the family finds the layout they know.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja"):
        if (source / name).is_file():
            assert (tmp_path / "pruned-0.3" / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_export_keeps_the_source_dtype_with_fewer_bytes(dtype: str, tmp_path: Path) -> None:
    source = build_stock("llava", tmp_path / "src", dtype)
    out = tmp_path / "pruned"
    result = hipp("prune", "--model", str(source), "--sparsity", "0.3", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert weight_dtypes(out) == {getattr(torch, dtype)}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert f"Weights: `{dtype}`, 1 safetensors file." in (out / "README.md").read_text()
    assert weight_bytes(out) < weight_bytes(source)

    # The in-memory pruned model in the export dtype against the export reloaded by plain transformers.
    loaded = load_model(str(source))
    batch = save_batch(loaded, tmp_path / "batch.pt")
    apply_plan(loaded.adapter, PruningPlan.load(out / PLAN_FILE))
    export_loaded(loaded, tmp_path / "again", plan=PruningPlan.load(out / PLAN_FILE))
    assert loaded.dtype == getattr(torch, dtype)
    batch = {k: v.to(loaded.dtype) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    report = reload(out, tmp_path / "batch.pt", tmp_path / "reloaded.pt")
    assert report["dtype"] == f"torch.{dtype}"
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), expected)


def test_dtype_option_overrides_the_export_dtype(stock_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    result = hipp("prune", "--model", str(stock_dir / "qwen2.5-vl-hub"), "--sparsity", "0.3", "--dtype", "bfloat16",
                  "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert weight_dtypes(out) == {torch.bfloat16}
    assert weight_bytes(out) < weight_bytes(stock_dir / "qwen2.5-vl-hub") / 2


def test_large_exports_are_sharded_with_an_index_and_reload(stock_dir: Path, tmp_path: Path) -> None:
    source = stock_dir / "qwen2.5-vl-stock-tied"
    out = tmp_path / "sharded"
    result = hipp("prune", "--model", str(source), "--sparsity", "0.3", "--max-shard-size", "100KB",
                  "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}

    loaded = load_model(str(source))
    batch = save_batch(loaded, tmp_path / "batch.pt")
    apply_plan(loaded.adapter, PruningPlan.load(out / PLAN_FILE))
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    report = reload(out, tmp_path / "batch.pt", tmp_path / "reloaded.pt")
    assert report["info"]["missing_keys"] == [] and report["info"]["unexpected_keys"] == []
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), expected)
    # ... and the engine loads the sharded export back (pruning it again is possible).
    assert load_model(str(out)).adapter.layer_shapes() == loaded.adapter.layer_shapes()


def _without(source: Path, target: Path, *names: str) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in names:
            (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-weights", "cannot load the weights"),
        ("no-tokenizer", "cannot build the processor"),
        ("unsupported", "is not supported; supported model types"),
    ],
)
def test_checkpoints_that_cannot_load_fail_with_one_line(case: str, expected: str, stock_dir: Path,
                                                         tmp_path: Path) -> None:
    source = stock_dir / "qwen2.5-vl-hub"
    if case == "no-weights":
        bad = _without(source, tmp_path / case, "model.safetensors")
    elif case == "no-tokenizer":
        bad = _without(source, tmp_path / case, "tokenizer.json", "tokenizer_config.json")
    else:
        bad = _without(source, tmp_path / case)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = hipp("prune", "--model", str(bad), "--sparsity", "0.3", "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("hipp: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_service_schema_offers_the_engines_dtypes() -> None:
    from typing import get_args

    from app.schemas import ExportOptions
    from worker.hipp.models.export_options import DTYPE_CHOICES

    assert get_args(ExportOptions.model_fields["dtype"].annotation) == DTYPE_CHOICES
