"""Checkpoint I/O: export a pruned model as a self-contained Hugging Face directory.

The directory loads in a fresh process with only torch + transformers:
``AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)``. It holds the stock config plus
per-layer shapes, two small generated files (``configuration_hipp_<type>.py``, ``modeling_hipp_<type>.py``)
that subclass the stock classes, the processor, safetensors weights, ``hipp_plan.json``, ``metrics.json`` and
a model card.

:func:`export_zero_padded` writes the other flavour: the stock architecture at dense shapes with removed
units zeroed, for tools that cannot run remote code (same logits, no speedup).

Exports are written in the source checkpoint's dtype unless told otherwise (:func:`export_loaded`), as
safetensors shards of at most ``max_shard_size`` with an index (``save_pretrained``'s format), and carry the
source folder's processor, tokenizer, chat template and generation config over byte for byte, so the checkpoint
stays familiar to users of its family.
"""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from worker.hipp.errors import OptionError
from worker.hipp.models.adapters.base import ModelAdapter
from worker.hipp.models.export_options import DEFAULT_MAX_SHARD_SIZE
from worker.hipp.models.loading import LoadedModel, cast_parameters
from worker.hipp.pruning.plan import LayerPlan, PruningPlan
from worker.hipp.pruning.rounding import describe as describe_rounding

TEMPLATES = Path(__file__).parent / "remote"
PLAN_FILE = "hipp_plan.json"
METRICS_FILE = "metrics.json"
#: Files of a checkpoint folder that belong to its processor, tokenizer, chat template or generation config.
CARRIED_FILES = (
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "*.model", "tiktoken*", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "processing_*.py", "image_processing_*.py", "video_processing_*.py",
    "tokenization_*.py",
)
CARRIED_DIRS = ("additional_chat_templates",)


def remote_names(base_class: str, config_class: str, base_type: str) -> dict[str, str]:
    """File, module and class names of the generated code. They carry the family, so exports of different
    families loaded in one process never share a cached module or a registered key mapping."""
    return {
        "config_module": f"configuration_hipp_{base_type}",
        "model_module": f"modeling_hipp_{base_type}",
        "config_class": f"Hipp{config_class}",
        "model_class": f"Hipp{base_class}",
    }


def _base_classes(model: Any) -> tuple[str, str, str]:
    """(model class, config class, model_type) of the stock transformers model behind ``model``."""
    config = model.config
    base_class = str(getattr(config, "hipp_base_model_class", None) or type(model).__name__)
    base_type = str(getattr(config, "hipp_base_model_type", None) or config.model_type)
    if not hasattr(transformers, base_class):
        raise OptionError(f"{base_class} is not a transformers class; only stock architectures can be exported")
    return base_class, getattr(transformers, base_class).config_class.__name__, base_type


def layer_shape_records(adapter: ModelAdapter) -> list[dict[str, int | bool]]:
    """Per decoder layer: its head counts and MLP width, and whether its o_proj / down_proj carry a bias (a
    FLAP bias-compensated layer gains one the stock config does not declare; the remote code creates it)."""
    return [
        {"num_attention_heads": layer.num_heads, "num_key_value_heads": layer.num_kv_heads,
         "intermediate_size": layer.intermediate_size,
         "o_proj_bias": layer.o_proj.bias is not None, "down_proj_bias": layer.down_proj.bias is not None}
        for layer in adapter.layers()
    ]


def _layers_path(adapter: ModelAdapter) -> str:
    target = adapter.decoder_layers
    for name, module in adapter.model.named_modules():
        if module is target:
            return name
    raise OptionError("decoder layers are not a sub-module of the model")


def write_remote_code(out: Path, base_class: str, config_class: str, base_type: str) -> dict[str, str]:
    names = remote_names(base_class, config_class, base_type)
    fields = {"base_model_class": base_class, "base_config_class": config_class,
              "base_model_type": base_type, "model_type": f"hipp_{base_type}", **names}
    for template, module in (("configuration_hipp.py", names["config_module"]),
                             ("modeling_hipp.py", names["model_module"])):
        text = (TEMPLATES / f"{template}.tmpl").read_text()
        (out / f"{module}.py").write_text(text.format(**fields))
    return names


def export_loaded(
    loaded: LoadedModel,
    out_dir: str | Path,
    *,
    plan: PruningPlan | None = None,
    metrics: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Export a loaded (and pruned) model in ``dtype``, by default the dtype its checkpoint was saved in, with
    the source folder's processor files. The model is cast to that dtype in place (no second copy)."""
    return export_pruned(loaded.model, loaded.processor, loaded.adapter, out_dir, plan=plan, metrics=metrics,
                         card=card, dtype=dtype or loaded.source_dtype, source_dir=loaded.source_dir,
                         max_shard_size=max_shard_size)


def export_pruned(
    model: nn.Module,
    processor: Any,
    adapter: ModelAdapter,
    out_dir: str | Path,
    plan: PruningPlan | None = None,
    metrics: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    source_dir: Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write the pruned ``model`` (already sliced by ``surgery.apply_plan``) to ``out_dir``.

    ``dtype`` casts the model in place first (None: as it is). The processor files of ``source_dir`` are
    copied unchanged; without any there, ``processor`` is saved.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        cast_parameters(model, dtype)
    base_class, config_class, base_type = _base_classes(model)
    names = write_remote_code(out, base_class, config_class, base_type)
    remote_cls: Any = get_class_from_dynamic_module(f"{names['model_module']}.{names['model_class']}", str(out))
    config = remote_cls.config_class(**_export_config_dict(model, adapter, base_class, base_type, names))
    exported = _as_remote_model(model, remote_cls, config)
    exported.save_pretrained(out, max_shard_size=max_shard_size)
    _write_processor(processor, source_dir, out)
    if plan is not None:
        plan.save(out / PLAN_FILE)
    (out / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=1))
    weights = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "weight_files": sorted(p.name for p in out.glob("*.safetensors"))}
    (out / "README.md").write_text(model_card(base_type, plan, metrics or {}, {**weights, **(card or {})}))
    return out


def carry_processor_files(source_dir: Path, out: Path) -> list[str]:
    """Copy the processor, tokenizer, chat template and generation config files of ``source_dir`` to ``out``
    unchanged; the names copied (none when the folder has no processor files)."""
    copied = []
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and any(fnmatch(path.name, pattern) for pattern in CARRIED_FILES):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
        elif path.is_dir() and path.name in CARRIED_DIRS:
            shutil.copytree(path, out / path.name, dirs_exist_ok=True)
            copied.append(path.name + "/")
    if copied == ["generation_config.json"]:
        return []  # a folder with weights and a generation config only: its processor came from elsewhere
    return copied


def _write_processor(processor: Any, source_dir: Path | None, out: Path) -> None:
    carried = carry_processor_files(source_dir, out) if source_dir is not None else []
    if not carried and processor is not None:
        processor.save_pretrained(out)


def _export_config_dict(model: Any, adapter: ModelAdapter, base_class: str, base_type: str,
                        names: dict[str, str]) -> dict[str, Any]:
    data = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        data.pop(key, None)
    data.update(
        hipp_layers=layer_shape_records(adapter),
        hipp_layers_path=_layers_path(adapter),
        hipp_base_model_type=base_type,
        hipp_base_model_class=base_class,
        auto_map={"AutoConfig": f"{names['config_module']}.{names['config_class']}",
                  "AutoModelForImageTextToText": f"{names['model_module']}.{names['model_class']}"},
        architectures=[names["model_class"]],
    )
    return data


def _as_remote_model(model: nn.Module, remote_cls: Any, config: Any) -> Any:
    """The remote class sharing ``model``'s tensors (built on the meta device: no second copy in memory)."""
    with torch.device("meta"):
        exported = remote_cls(config)
    exported.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        owner = exported.get_submodule(module_name)
        if getattr(owner, attr).is_meta:
            owner._buffers[attr] = buffer
    exported.config.dtype = next(model.parameters()).dtype
    exported.eval()
    return exported


def model_card(base_type: str, plan: PruningPlan | None, metrics: dict[str, Any], card: dict[str, Any]) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [hipp-prune, pruned, vision-language]", "---", "",
        f"# HiPP-Prune pruned {base_type} model", "",
    ]
    if card.get("source_model"):
        lines.append(f"Pruned from `{card['source_model']}`.")
    if card.get("preference"):
        lines.append(f"Preference (utility, robustness, compression): `{card['preference']}`.")
    if card.get("dtype"):
        files = card.get("weight_files") or []
        lines.append(f"Weights: `{card['dtype']}`, {len(files)} safetensors file{'s' if len(files) != 1 else ''}.")
    if plan is not None:
        s = plan.summary()
        lines += [
            "", "## Pruning", "",
            f"- sparsity of the language-model decoder: {s['sparsity']:.4f}",
            f"- fraction of the whole model removed: {s['model_fraction_removed']:.4f}",
            f"- parameters: {s['total_parameters'] - s['removed_parameters']:,} (dense {s['total_parameters']:,})",
            f"- plan fingerprint: `{plan.fingerprint}`; criterion `{plan.meta.get('criterion')}`, "
            f"allocation `{plan.meta.get('allocation')}`",
            *([f"- {describe_rounding(s['rounding'])}"] if "rounding" in s else []),
            *(["- bias compensation (FLAP): the removed heads' and channels' calibration means are folded into "
               "o_proj / down_proj biases (`o_proj_bias` / `down_proj_bias` in `hipp_layers`)"]
              if plan.meta.get("bias_compensation") else []),
            "", "| layer | query heads | KV heads | MLP width | layer sparsity |", "|---|---|---|---|---|",
        ]
        lines += [
            f"| {i} | {layer['heads']} | {layer['kv_heads']} | {layer['channels']} | {layer['sparsity']:.3f} |"
            for i, layer in enumerate(s["layers"])
        ]
    lines += latency_lines(metrics.get("latency"))
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=1), "```"]
    lines += [
        "", "## How to load", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)",
        "```", "",
        "The decoder layers have per-layer head counts and MLP widths (`hipp_layers` in config.json);",
        "`modeling_hipp_*.py` builds the stock model and narrows those layers. `hipp_plan.json` records which",
        "original heads and channels were kept.", "",
    ]
    return "\n".join(lines)


def latency_lines(latency: dict[str, Any] | None) -> list[str]:
    """The model card's latency table (dense vs pruned on the job's device, against the ideal speedup)."""
    if not latency or "pruned" not in latency:
        return []
    dense, pruned = latency["dense"], latency["pruned"]
    speedup, over = latency["speedup"], latency["speedup_over_ideal"]
    return [
        "", "## Latency", "",
        f"Measured on {latency['device']} for a fixed prompt of {pruned['prompt_tokens']} tokens "
        f"(static KV cache{', compiled' if pruned.get('compiled') else ''}); ideal speedup "
        f"{latency['ideal_speedup']:.3f} (dense over pruned FLOPs per token).", "",
        "| | dense | pruned | speedup | of ideal |", "|---|---|---|---|---|",
        f"| prefill (ms) | {dense['prefill_ms']:.2f} | {pruned['prefill_ms']:.2f} | {speedup['prefill']} | "
        f"{over['prefill']} |",
        f"| decode (ms/token) | {dense['decode_ms_per_token']:.2f} | {pruned['decode_ms_per_token']:.2f} | "
        f"{speedup['decode']} | {over['decode']} |",
        "", "Decode with the same path: `model.generate(**inputs, cache_implementation=\"static\")` "
        "(compiled with CUDA graphs on a GPU).",
    ]


# --- zero-padded dense export ------------------------------------------------------------------------


@torch.no_grad()
def export_zero_padded(
    model: Any, processor: Any, adapter: ModelAdapter, plan: PruningPlan, out_dir: str | Path, *,
    source_dir: Path | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write the stock architecture at dense shapes, removed units as zeros (no remote code needed), in the
    model's dtype, with the processor files of ``source_dir`` when it has them."""
    base_class, _, base_type = _base_classes(model)
    data = model.config.to_dict()
    for key in list(data):
        if key.startswith("hipp_") or key in ("auto_map", "architectures", "model_type", "transformers_version"):
            data.pop(key)
    stock_cls = getattr(transformers, base_class)
    config = stock_cls.config_class(**data)
    with torch.device("meta"):
        dense = stock_cls(config)
    state = dict(model.state_dict())
    for layer, shape, lp in zip(adapter.layers(), plan.geometry.layers, plan.layers, strict=True):
        prefix = _module_prefix(model, layer.layer)
        state.update(_padded_layer_state(layer, shape, lp, prefix))
    extra = sorted(set(state) - set(dense.state_dict()))
    if extra:
        # A FLAP bias-compensated o_proj / down_proj bias the stock config does not declare: refuse rather
        # than drop the compensation.
        raise OptionError(
            f"{extra[0]} (bias compensation) has no place in the stock architecture; export this model in the "
            "per-layer (remote code) format instead of zero-padded"
        )
    dense.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        owner = dense.get_submodule(module_name)
        if getattr(owner, attr).is_meta:
            owner._buffers[attr] = buffer
    out = Path(out_dir)
    dense.config.dtype = next(model.parameters()).dtype
    dense.save_pretrained(out, max_shard_size=max_shard_size)
    _write_processor(processor, source_dir, out)
    plan.save(out / PLAN_FILE)
    return out


def _module_prefix(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name + "."
    raise OptionError("layer not found in model")


def _padded_layer_state(layer: Any, shape: Any, lp: LayerPlan, prefix: str) -> dict[str, torch.Tensor]:
    d = shape.head_dim
    head_rows = torch.tensor([h * d + i for h in lp.head_order(shape) for i in range(d)], dtype=torch.long)
    kv_rows = torch.tensor([g * d + i for g in lp.kv_heads for i in range(d)], dtype=torch.long)
    channels = torch.tensor(lp.channels, dtype=torch.long)
    hidden = layer.q_proj.in_features
    state: dict[str, torch.Tensor] = {}

    def pad(name: str, linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None,
            out_f: int, in_f: int) -> None:
        weight = linear.weight.new_zeros(out_f, in_f)
        if rows is not None:
            weight[rows] = linear.weight
        else:
            assert cols is not None
            weight[:, cols] = linear.weight
        state[f"{prefix}{name}.weight"] = weight
        if linear.bias is not None:
            if rows is not None:
                bias = linear.bias.new_zeros(out_f)
                bias[rows] = linear.bias
            else:
                bias = linear.bias.clone()
            state[f"{prefix}{name}.bias"] = bias

    attn = _module_prefix(layer.layer, layer.attention)
    mlp = _module_prefix(layer.layer, layer.mlp)
    nh, nkv, width = shape.num_heads * d, shape.num_kv_heads * d, shape.intermediate_size
    pad(attn + "q_proj", layer.q_proj, head_rows, None, nh, hidden)
    pad(attn + "k_proj", layer.k_proj, kv_rows, None, nkv, hidden)
    pad(attn + "v_proj", layer.v_proj, kv_rows, None, nkv, hidden)
    pad(attn + "o_proj", layer.o_proj, None, head_rows, hidden, nh)
    pad(mlp + "gate_proj", layer.gate_proj, channels, None, width, hidden)
    pad(mlp + "up_proj", layer.up_proj, channels, None, width, hidden)
    pad(mlp + "down_proj", layer.down_proj, None, channels, hidden, width)
    return state
