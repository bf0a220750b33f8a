"""Load a model reference into model + processor + adapter.

A reference is a built-in name (``tiny-llava``, ``testbed``), a local Hugging Face directory (pruned
HiPP exports included), or a hub id resolved through the normal Hugging Face cache. An unknown reference
fails with a message that lists what was tried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.hipp import builtin
from worker.hipp.adapters import ModelAdapter, get_adapter
from worker.hipp.errors import ModelNotFoundError, OptionError

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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise OptionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def load_model(
    ref: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = True,
) -> LoadedModel:
    """Load ``ref`` for pruning. ``attn_implementation="eager"`` is needed for attention weights."""
    torch_dtype = resolve_dtype(dtype)
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise OptionError(
            f"unknown attention implementation {attn_implementation!r}; use one of {ATTN_IMPLEMENTATIONS}"
        )
    model: Any
    model, processor = _load_model_and_processor(ref, torch_dtype, attn_implementation, trust_remote_code)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    return LoadedModel(model=model, processor=processor, adapter=get_adapter(model), reference=ref)


def _load_model_and_processor(
    ref: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
) -> tuple[nn.Module, Any]:
    tried: list[str] = []
    if ref in builtin.BUILTINS:
        return builtin.BUILTINS[ref]()
    tried.append(f"built-in names ({', '.join(builtin.builtin_names())})")
    path = Path(ref).expanduser()
    if ref == "testbed":
        if not (builtin.TESTBED_DIR / "config.json").is_file():
            raise ModelNotFoundError(f"the testbed weights are not installed at {builtin.TESTBED_DIR}")
        path = builtin.TESTBED_DIR
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model")
        return _from_pretrained(str(path), dtype, attn_implementation, trust_remote_code)
    tried.append(f"a local directory {str(path.resolve())!r} (does not exist)")
    if _HUB_ID.match(ref):
        try:
            return _from_pretrained(ref, dtype, attn_implementation, trust_remote_code)
        except OSError as exc:
            tried.append(f"the Hugging Face hub id {ref!r} ({_first_line(exc)})")
    else:
        tried.append("a Hugging Face hub id (not of the form owner/name)")
    raise ModelNotFoundError(f"model {ref!r} not found; tried " + "; ".join(tried))


def _from_pretrained(
    source: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, processor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
