"""Which model references a job may name, checked in the API before anything is queued (no torch here).

Allowed: a built-in name from ``HIPP_ALLOWED_MODELS``; a folder under one of ``HIPP_MODEL_DIRS`` (never an
arbitrary server path); a Hugging Face hub id ``org/name`` when ``HIPP_ALLOW_HUB_MODELS`` is on (no ``.``/``..``
or hidden parts; the worker loads hub ids from the hub only, never from a folder of that name). The worker
still loads it, and a model that then fails to load fails the job with a non-retryable ``model_not_found``.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings
from app.errors import ApiError

# owner/name, each part starting with a letter or digit, dots only between other characters: no ``.``, ``..``,
# hidden or leading-dash parts, so an id can never name a folder relative to a worker's directory.
_PART = r"[A-Za-z0-9](?:[\w-]|\.(?=[\w-])){0,95}"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
POLICY_TOKEN = re.compile(r"^[A-Za-z0-9][\w-]{0,127}$")  # a stored policy's id or a model fingerprint


def _under(path: Path, roots: list[Path]) -> Path | None:
    for root in roots:
        root = root.expanduser().resolve()
        if path == root or root in path.parents:
            return root
    return None


def check_policy_uri(uri: str, settings: Settings) -> str:
    """A policy's ``uri`` is a stored policy's id or model fingerprint, or a folder under
    ``HIPP_POLICY_DIRS`` (or ``HIPP_MODEL_DIRS``). Anything else is refused here, so the worker never looks at
    an arbitrary server path for a tenant (and its events cannot tell which paths exist)."""
    if POLICY_TOKEN.match(uri):
        return uri
    roots = [*settings.policy_dirs, *settings.model_dirs]
    if uri.startswith("/") and roots:
        path = Path(uri).resolve()
        if _under(path, roots) is not None:
            return str(path)
    where = f"an absolute folder under {', '.join(str(d) for d in roots)}" if roots else "no folder (none configured)"
    raise ApiError(
        422,
        "invalid_policy_uri",
        f"policy uri {uri!r} is not allowed: use a stored policy's id or model fingerprint (letters, digits, "
        f"'_' and '-'), or {where}",
        detail={"uri": uri},
    )


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
    if settings.allow_hub_models and HUB_ID.match(ref) and not looks_like_path and ".." not in ref:
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


#: The built-in name of the shipped testbed: the one model whose own distribution is the synthetic world.
#: The testbed family's model references (``worker.hipp.models.builtin.TESTBEDS``; the API cannot import the
#: engine, a test keeps the two equal).
TESTBEDS = ("testbed", "testbed-seed1", "testbed-deep")


def is_testbed(model: str) -> bool:
    """Whether ``model`` is of the testbed family, the models the synthetic world's data is in-distribution for
    (so they are calibrated, evaluated and recovered on that world by default; any other model needs the
    tenant's data or an explicit request for the world)."""
    return model.strip() in TESTBEDS
