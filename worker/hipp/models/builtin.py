"""Built-in model references by name: the tiny random-weight models of each family and the shipped testbeds.

The builders live in ``builtin_llava`` and ``builtin_qwen``; this module only names them, so adding a built-in
is one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from worker.hipp.models.builtin_llava import TinyLlavaSpec, build_tiny_llava
from worker.hipp.models.builtin_qwen import TinyQwenSpec, build_tiny_qwen

#: The trained testbed's folder (shipped inside the engine package).
TESTBED_DIR = Path(__file__).resolve().parent.parent / "testbed" / "model"
#: The testbed family: models trained by the same recipe on the same world (another training seed, another
#: depth), each with its model card; every name is a model reference.
FAMILY_DIR = TESTBED_DIR.parent / "family"
TESTBEDS: dict[str, Path] = {
    "testbed": TESTBED_DIR,
    "testbed-seed1": FAMILY_DIR / "seed1",
    "testbed-deep": FAMILY_DIR / "deep",
}

BUILTINS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "tiny-llava": lambda: build_tiny_llava(TinyLlavaSpec()),
    "tiny-llava-mha": lambda: build_tiny_llava(TinyLlavaSpec(num_kv_heads=8)),
    "tiny-llava-bias": lambda: build_tiny_llava(TinyLlavaSpec(attention_bias=True, mlp_bias=True)),
    "tiny-qwen2.5-vl": lambda: build_tiny_qwen(TinyQwenSpec(version="2.5")),
    "tiny-qwen2-vl": lambda: build_tiny_qwen(TinyQwenSpec(version="2")),
}


def builtin_names() -> list[str]:
    return [*BUILTINS, *TESTBEDS]


def is_testbed(ref: str) -> bool:
    """Whether ``ref`` names a model of the testbed family (trained on the project's world)."""
    return ref in TESTBEDS


__all__ = ["BUILTINS", "FAMILY_DIR", "TESTBEDS", "TESTBED_DIR", "builtin_names", "is_testbed"]
