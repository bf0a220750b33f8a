"""Policies through the API: register a trained one, train one as a job, list, show, and wait for a training.
``HippClient`` inherits :class:`PoliciesMixin`; answers are :class:`Policy` (and the training's :class:`Job`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from hipp_client.errors import BAD_RESPONSE, HippApiError
from hipp_client.types import Job, Policy

#: The training options ``train_policy`` passes on (``POST /policies`` ``train``; the server checks them).
TRAIN_OPTIONS = ("steps", "group_size", "preferences_per_step", "budget_min", "budget_max", "time_budget_s",
                 "seed", "search_limit", "calibration_samples")


def _policy(data: Any) -> Policy:
    try:
        return Policy.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise HippApiError(None, BAD_RESPONSE, f"unexpected answer from the API ({exc!r}): {str(data)[:300]}") from exc


def _ident(value: Any) -> str | None:
    """An id given as a string, a UUID or an object with ``id`` (a ``Dataset``)."""
    if value is None:
        return None
    return str(getattr(value, "id", value))


class PoliciesMixin:
    """The policies resource; mixed into ``HippClient`` (which provides ``request`` and ``wait``)."""

    request: Callable[..., Any]
    wait: Callable[..., Job]

    def list_policies(self, model: str | None = None, *, status: str | None = None) -> list[Policy]:
        """The tenant's policies, newest first; ``model``: only those for it; ``status``: training | ready |
        failed | cancelled."""
        params = {k: v for k, v in (("model", model), ("status", status)) if v is not None}
        return [_policy(p) for p in self.request("GET", "/policies", params=params)]

    def get_policy(self, policy_id: str) -> Policy:
        return _policy(self.request("GET", f"/policies/{quote(str(policy_id), safe='')}"))

    def register_policy(
        self,
        name: str,
        model: str,
        *,
        fingerprint: str | None = None,
        uri: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Policy:
        """Register a trained policy for ``model`` (``uri``: a stored policy's id or fingerprint, or a folder the
        server allows). Not retried: a repeat would register it twice."""
        body: dict[str, Any] = {"name": name, "model": model, "metrics": dict(metrics or {})}
        body["metadata"] = dict(metadata or {})
        if fingerprint is not None:
            body["fingerprint"] = fingerprint
        if uri is not None:
            body["uri"] = uri
        return _policy(self.request("POST", "/policies", json=body))

    def train_policy(
        self,
        model: str,
        name: str | None = None,
        *,
        search_pope: Any = None,
        search_scienceqa: Any = None,
        metadata: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Policy:
        """Queue the training of a policy for ``model`` (a ``training`` policy whose ``job_id`` is the job:
        follow it with :meth:`wait_policy`, cancel it with ``cancel_job``). ``options``: ``steps``,
        ``group_size``, ``preferences_per_step``, ``budget_min``, ``budget_max``, ``time_budget_s``, ``seed``,
        ``search_limit``, ``calibration_samples`` (server defaults for those not given); ``search_pope`` /
        ``search_scienceqa``: the data sets (ids or ``Dataset``) plans are scored on (required unless the
        model is of the testbed family). Not retried: a repeat would train twice."""
        unknown = sorted(set(options) - set(TRAIN_OPTIONS))
        if unknown:
            raise TypeError(f"train_policy: unknown option(s) {', '.join(unknown)}; known: {', '.join(TRAIN_OPTIONS)}")
        train: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        search = {k: _ident(v) for k, v in (("pope", search_pope), ("scienceqa", search_scienceqa)) if v is not None}
        if search:
            train["search"] = search
        body = {"name": name or f"{model} policy", "model": model, "train": train, "metadata": dict(metadata or {})}
        return _policy(self.request("POST", "/policies", json=body))

    def wait_policy(
        self, policy: Policy | str, *, timeout: float | None = None, on_update: Callable[[Job], None] | None = None
    ) -> Policy:
        """Follow a trained policy's job until it ends (``on_update`` gets each state of the job), then return
        the policy: ``ready``, ``failed`` or ``cancelled`` (the job's ``error`` says why)."""
        current = policy if isinstance(policy, Policy) else self.get_policy(policy)
        if current.job_id is not None:
            self.wait(current.job_id, timeout=timeout, on_update=on_update)
        return self.get_policy(current.id)
