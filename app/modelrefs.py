"""Which model references a job may name, checked in the API before anything is queued (no torch here).

Allowed: a built-in name from ``HIPP_ALLOWED_MODELS``; a folder under one of ``HIPP_MODEL_DIRS`` (never an
arbitrary server path); a Hugging Face hub id ``org/name`` when ``HIPP_ALLOW_HUB_MODELS`` is on. The worker
still loads it, and a model that then fails to load fails the job with a non-retryable ``model_not_found``.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings
from app.errors import ApiError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def check_model_ref(ref: str, settings: Settings) -> str:
    if ref in settings.allowed_models:
        return ref
    looks_like_path = ref.startswith(("/", ".", "~"))
    if settings.model_dirs and (looks_like_path or "/" in ref):
        candidate = Path(ref).expanduser()
        for root in settings.model_dirs:
            root = root.expanduser().resolve()
            path = (candidate if candidate.is_absolute() else root / candidate).resolve()
            if (path == root or root in path.parents) and (path / "config.json").is_file():
                return str(path)
    if settings.allow_hub_models and HUB_ID.match(ref) and not looks_like_path:
        return ref
    options = [f"a built-in model ({', '.join(settings.allowed_models) or 'none configured'})"]
    if settings.model_dirs:
        options.append(f"a model folder under {', '.join(str(d) for d in settings.model_dirs)}")
    if settings.allow_hub_models:
        options.append("a Hugging Face hub id like 'org/name'")
    raise ApiError(
        422,
        "unknown_model",
        f"unknown model {ref!r}: use {' or '.join(options)}",
        detail={"model": ref, "allowed": settings.allowed_models},
    )
