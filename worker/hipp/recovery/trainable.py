"""What recovery trains and the checks around it: the decoder linears it adapts (never the vision tower's), LoRA
wrapping (peft, merged back by the loop), the parameters handed to the optimizer, and the checks that the
student came back as the plain pruned architecture.

Imports ``models`` and this room's ``config``; peft only when LoRA is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from worker.hipp.errors import HippError
from worker.hipp.models.loading import LoadedModel
from worker.hipp.recovery.config import RecoveryConfig


def target_linears(loaded: LoadedModel, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """Full module names -> the decoder linears named in ``targets`` (never the vision tower's q/k/v)."""
    wanted: dict[int, nn.Linear] = {}
    for layer in loaded.adapter.layers():
        for name in targets:
            linear = getattr(layer, name)
            # A fully removed MLP leaves 0-wide linears: nothing to adapt there.
            if linear.in_features and linear.out_features:
                wanted[id(linear)] = linear
    names = {name: module for name, module in loaded.model.named_modules() if id(module) in wanted}
    assert len(names) == len(wanted), "a target linear is not a named sub-module of the model"
    return {name: names[name] for name in sorted(names)}  # type: ignore[misc]


def decoder_shapes(loaded: LoadedModel) -> list[tuple[int, int, int]]:
    return [(la.num_heads, la.num_kv_heads, la.intermediate_size) for la in loaded.adapter.layers()]


def assert_plain_model(model: nn.Module) -> None:
    """No peft module or LoRA tensor is left (what a merged model must satisfy before export)."""
    leftover = sorted({type(m).__module__ for m in model.modules() if type(m).__module__.startswith("peft")})
    keys = [k for k in model.state_dict() if "lora_" in k]
    if leftover or keys:
        raise HippError(f"LoRA was not fully merged: modules from {leftover}, keys {keys[:3]}")


def wrap_lora(loaded: LoadedModel, names: Sequence[str], config: RecoveryConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    r = config.resolved()
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=r.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        # Full module names match exactly, so the vision tower's own q/k/v/out projections are never adapted.
        target_modules=list(names),
        bias="none",
    )
    return get_peft_model(loaded.model, lora)


def trainable_model(student: LoadedModel, linears: dict[str, nn.Linear], config: RecoveryConfig
                    ) -> tuple[Any, list[nn.Parameter]]:
    """The module to train and its trainable parameters: a LoRA-wrapped model with its adapters, or (``kd``)
    the student itself with only the target linears' own weights left trainable."""
    if config.uses_lora:
        model = wrap_lora(student, list(linears), config)
        return model, [p for p in model.parameters() if p.requires_grad]
    for p in student.model.parameters():
        p.requires_grad_(False)
    params = [p for lin in linears.values() for p in lin.parameters()]
    for p in params:
        p.requires_grad_(True)
    return student.model, params
