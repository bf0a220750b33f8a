"""Policy artifacts: a trained policy as safetensors + JSON metadata, found by id or model fingerprint.

A policy directory holds ``policy.safetensors`` (weights), ``policy.json`` (id, model fingerprint and
reference, feature names, policy and training configs, training metrics) and optionally the policy state it
was trained on and its learning curve. Shipped policies live in ``worker/hipp/policy/shipped``; users' in the
directory given by ``HIPP_POLICY_DIR`` (default ``~/.cache/hipp/policies``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.hipp.errors import OptionError
from worker.hipp.models.adapters.base import ModelAdapter
from worker.hipp.policy.network import HippPolicy, PolicyConfig
from worker.hipp.pruning.plan import geometry_of

SHIPPED = Path(__file__).parent / "shipped"
WEIGHTS, META = "policy.safetensors", "policy.json"


def user_policy_dir() -> Path:
    return Path(os.environ.get("HIPP_POLICY_DIR", Path.home() / ".cache" / "hipp" / "policies"))


def model_fingerprint(adapter: ModelAdapter) -> str:
    """Geometry plus a digest of a slice of every decoder layer's weights: same model, same fingerprint."""
    digest = hashlib.sha256(json.dumps(geometry_of(adapter).to_dict(), sort_keys=True).encode())
    with torch.no_grad():
        for layer in adapter.layers():
            for linear in (layer.q_proj, layer.down_proj):
                digest.update(linear.weight[:2].detach().float().cpu().numpy().round(5).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class StoredPolicy:
    policy: HippPolicy
    meta: dict[str, Any]
    path: Path

    @property
    def id(self) -> str:
        return str(self.meta["id"])


def save_policy(policy: HippPolicy, out: Path, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(out / WEIGHTS))
    record = {"id": meta.get("id") or uuid.uuid4().hex[:12], "created_at": time.time(),
              "policy_config": policy.config.to_dict(), **meta}
    (out / META).write_text(json.dumps(record, indent=1))
    return out


def load_policy_dir(path: Path) -> StoredPolicy:
    from safetensors.torch import load_file

    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise OptionError(f"{path} is not a policy directory (needs {WEIGHTS} and {META})")
    meta = json.loads((path / META).read_text())
    # Policies saved before the anchored budget head have no budget_head entry: theirs is the logistic one.
    policy = HippPolicy(PolicyConfig(**{"budget_head": "logistic", **meta["policy_config"]}))
    policy.load_state_dict(load_file(str(path / WEIGHTS)))
    policy.eval()
    return StoredPolicy(policy, meta, path)


def _candidates() -> list[Path]:
    found = []
    for root in (SHIPPED, user_policy_dir()):
        if root.is_dir():
            found += sorted(p.parent for p in root.glob(f"*/{META}"))
    return found


def list_policies() -> list[dict[str, Any]]:
    return [{**json.loads((p / META).read_text()), "path": str(p)} for p in _candidates()]


def find_policy(ref: str) -> StoredPolicy:
    """A policy by directory, id, or model fingerprint (newest first)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return load_policy_dir(path)
    matches = [p for p in _candidates()
               if ref in (json.loads((p / META).read_text()).get("id"),
                          json.loads((p / META).read_text()).get("model_fingerprint"))]
    if not matches:
        raise OptionError(f"no policy {ref!r}: not a directory, and no stored policy has that id or model "
                          f"fingerprint (looked in {SHIPPED} and {user_policy_dir()})")
    newest = max(matches, key=lambda p: json.loads((p / META).read_text()).get("created_at", 0))
    return load_policy_dir(newest)


def policy_for_model(adapter: ModelAdapter) -> StoredPolicy | None:
    """The newest stored policy trained for this exact model, if any."""
    try:
        return find_policy(model_fingerprint(adapter))
    except OptionError:
        return None
