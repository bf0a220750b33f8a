"""Load a model reference into model + processor + adapter.

A reference is a built-in name (``tiny-llava``, ``testbed``), a local Hugging Face directory (pruned
HiPP exports included), or a hub id resolved through the normal Hugging Face cache. An unknown reference
fails with a message that lists what was tried; a model that is found but cannot be loaded as it is (missing
weights, an architecture without an adapter, a processor that cannot be built here) fails with a
:class:`ModelNotLoadableError` or :class:`UnsupportedModelError` that says what to fix: both are final, a retry
would fail the same way.

Weights are loaded in the checkpoint's own dtype by default (``dtype="auto"``), so a bf16 checkpoint costs
bf16 memory and its export is bf16 again. The one exception is float16 on a CPU, which has no fast float16
kernels: it is computed in float32 and still exported as float16 (``LoadedModel.source_dtype``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.hipp.errors import ModelNotFoundError, ModelNotLoadableError, OptionError, UnsupportedModelError
from worker.hipp.models import builtin
from worker.hipp.models.adapters import ModelAdapter, get_adapter
from worker.hipp.models.adapters.base import adapter_class_for, registered_model_types
from worker.hipp.models.export_options import AUTO, DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    adapter: ModelAdapter
    reference: str
    #: The dtype the checkpoint was saved in: what an export writes unless told otherwise.
    source_dtype: torch.dtype = torch.float32
    #: The folder the checkpoint was read from (None for built-in models): its processor, tokenizer, chat
    #: template and generation config are carried into exports unchanged.
    source_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise OptionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(source: torch.dtype, device: str) -> torch.dtype:
    """The dtype ``dtype="auto"`` computes in: the checkpoint's, except float16 on a CPU (see module doc)."""
    if source == torch.float16 and torch.device(device).type == "cpu":
        return torch.float32
    return source


def load_model(
    ref: str,
    *,
    dtype: str | torch.dtype = AUTO,
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = True,
) -> LoadedModel:
    """Load ``ref`` for pruning. ``dtype="auto"`` keeps the checkpoint's dtype (see the module doc);
    ``attn_implementation="eager"`` is needed for attention weights."""
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise OptionError(
            f"unknown attention implementation {attn_implementation!r}; use one of {ATTN_IMPLEMENTATIONS}"
        )
    requested = None if dtype == AUTO else resolve_dtype(dtype)
    if ref in builtin.BUILTINS:
        model, processor = builtin.BUILTINS[ref]()
        source_dtype, source_dir = next(model.parameters()).dtype, None
    else:
        source = _resolve_source(ref)
        config = _read_config(source)
        source_dtype = checkpoint_dtype(config)
        model, processor = _from_pretrained(source, model_type_of(config), requested or compute_dtype(
            source_dtype, device), attn_implementation, trust_remote_code)
        source_dir = _local_dir(source)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)  # type: ignore[operator]
    cast_parameters(model, requested or compute_dtype(source_dtype, device))  # built-ins; a no-op otherwise
    model.to(device=device)
    model.eval()
    adapter = get_adapter(model)
    _check_tokenizer(ref, processor, adapter)
    return LoadedModel(model=model, processor=processor, adapter=adapter, reference=ref,
                       source_dtype=source_dtype, source_dir=source_dir)


def _check_tokenizer(ref: str, processor: Any, adapter: ModelAdapter) -> None:
    """transformers builds an empty tokenizer when its files are missing; catch it here, not mid-prune."""
    tokenizer = getattr(processor, "tokenizer", processor)
    size = len(tokenizer)
    if adapter.image_token_id >= size:
        raise ModelNotLoadableError(
            f"cannot build the processor of {ref}: its tokenizer has {size} tokens but the model's image token id "
            f"is {adapter.image_token_id}; the tokenizer files (tokenizer.json, tokenizer_config.json) are missing "
            "or belong to another model"
        )


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights to ``dtype`` in place, one tensor at a time (no second copy of the model). Buffers keep
    their dtype: rotary frequencies stay float32 as ``from_pretrained`` builds them, whatever the weights."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _resolve_source(ref: str) -> str:
    """The directory or hub id ``ref`` names; a message listing what was tried when it names nothing."""
    if builtin.is_testbed(ref):
        folder = builtin.TESTBEDS[ref]
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"the {ref} weights are not installed at {folder}")
        return str(folder)
    tried = [f"built-in names ({', '.join(builtin.builtin_names())})"]
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model")
        return str(path)
    tried.append(f"a local directory {str(path.resolve())!r} (does not exist)")
    if _HUB_ID.match(ref):
        try:
            if _checkpoint_file(ref, "config.json") is not None:
                return ref
            tried.append(f"the Hugging Face hub id {ref!r} (it has no config.json)")
        except OSError as exc:
            tried.append(f"the Hugging Face hub id {ref!r} ({_first_line(exc)})")
    else:
        tried.append("a Hugging Face hub id (not of the form owner/name)")
    raise ModelNotFoundError(f"model {ref!r} not found; tried " + "; ".join(tried))


def _local_dir(source: str) -> Path:
    """The folder of ``source``: itself, or the hub cache's snapshot folder of a resolved hub id."""
    path = Path(source)
    config = path / "config.json" if path.is_dir() else _checkpoint_file(source, "config.json")
    if config is None:
        raise ModelNotFoundError(f"{source} has no config.json")
    return config.parent


def _read_config(source: str) -> dict[str, Any]:
    path = _local_dir(source) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotLoadableError(f"cannot read {path.name} of {source}: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelNotLoadableError(f"{path.name} of {source} is not a JSON object")
    return data


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint stores its weights in, from its ``config.json``: ``dtype`` (or the older
    ``torch_dtype``), else float32 as transformers assumes."""
    for holder in (config, config.get("text_config") or {}):
        name = holder.get("dtype") or holder.get("torch_dtype")
        if isinstance(name, str) and name in DTYPES:
            return DTYPES[name]
    return torch.float32


def model_type_of(config: dict[str, Any]) -> str:
    """The family a ``config.json`` belongs to (a HiPP export names its base model's)."""
    return str(config.get("hipp_base_model_type") or config.get("model_type") or "")


def _from_pretrained(
    source: str, model_type: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForImageTextToText

    adapter_cls = adapter_class_for(model_type)
    if adapter_cls is None:
        raise UnsupportedModelError(
            f"{source}: model type {model_type or '(none)'!r} is not supported; supported model types: "
            f"{', '.join(registered_model_types())}"
        )
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        files = safetensors_files(source)
        if files:
            model = _from_state_dict(source, files, dtype, trust_remote_code, kwargs)
        else:  # .bin checkpoints: transformers' own path
            model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except torch.OutOfMemoryError:
        raise  # may succeed on another worker: not the checkpoint's fault
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelNotLoadableError(f"cannot load the weights of {source}: {_first_line(exc)}") from exc
    try:
        processor = adapter_cls.load_processor(source, model_type, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError, AttributeError, TypeError) as exc:
        raise ModelNotLoadableError(
            f"cannot build the processor of {source}: {_first_line(exc)}; the checkpoint needs its processor "
            "files (preprocessor_config.json or processor_config.json, tokenizer files) and the packages they name"
        ) from exc
    return model, processor


def safetensors_files(source: str) -> list[Path]:
    """The safetensors files of the checkpoint at ``source`` (its shards, by the index, when sharded)."""
    index = _checkpoint_file(source, "model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [_checkpoint_file(source, shard) for shard in shards]
        missing = [name for name, path in zip(shards, paths, strict=True) if path is None]
        if missing:
            raise ModelNotLoadableError(f"{source}: shard(s) {', '.join(missing)} named by {index.name} are missing")
        return [path for path in paths if path is not None]
    single = _checkpoint_file(source, "model.safetensors")
    return [single] if single is not None else []


def _checkpoint_file(source: str, name: str) -> Path | None:
    path = Path(source)
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    from transformers.utils import cached_file

    resolved = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    return Path(resolved) if resolved else None


def read_state_dict(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` read into its own memory (``pread``, not a memory map) and cast to ``dtype`` one
    at a time. Memory-mapped weights would stay resident beside the narrower copies surgery makes (the mapping
    lives while any tensor of the file does); read this way, peak memory is the model plus one tensor."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _model_class(config: Any, source: str, trust_remote_code: bool) -> Any:
    """The class ``AutoModelForImageTextToText`` would build for ``config`` (remote code for HiPP exports)."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForImageTextToText" in auto_map and trust_remote_code:
        return get_class_from_dynamic_module(auto_map["AutoModelForImageTextToText"], source)
    try:
        return transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedModelError(
            f"{source}: {type(config).__name__} has no image-text-to-text model class in transformers"
        ) from None


def _from_state_dict(source: str, files: list[Path], dtype: torch.dtype, trust_remote_code: bool,
                     kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    model_cls = _model_class(config, source, trust_remote_code)
    # from_pretrained with a state dict builds the model on the meta device and takes these tensors over
    # (key renames of older checkpoints included): no second copy.
    model = model_cls.from_pretrained(None, config=config, state_dict=read_state_dict(files, dtype), **kwargs)
    if _checkpoint_file(source, "generation_config.json") is not None:
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def _first_line(exc: BaseException) -> str:
    """The first sentence of ``exc``'s message, on one line (library messages wrap and run on)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    sentence = text.split(". ", 1)[0].rstrip(".")
    return sentence or type(exc).__name__
