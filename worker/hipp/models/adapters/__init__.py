"""Model adapters, one file per family. Every module in this package is imported so its
``@register_adapter`` runs (registering the class in ``base.ADAPTERS``, a :class:`worker.hipp.registry.Registry`
keyed by model type): adding a family means adding one file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from worker.hipp.errors import UnsupportedModelError
from worker.hipp.models.adapters.base import (
    ADAPTERS,
    LayerAdapter,
    LayerShape,
    ModelAdapter,
    adapter_class_for,
    register_adapter,
    registered_model_types,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by its config's model type (pruned exports included)."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "hipp_base_model_type", None) or getattr(config, "model_type", ""))
    cls = adapter_class_for(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"no adapter for model type {model_type!r}; supported: {', '.join(registered_model_types())}"
        )
    return cls(model)


__all__ = ["ADAPTERS", "LayerAdapter", "LayerShape", "ModelAdapter", "adapter_class_for", "get_adapter",
           "register_adapter", "registered_model_types"]
