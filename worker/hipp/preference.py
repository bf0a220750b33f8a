"""The user's preference between task utility, hallucination robustness and compression: the one owner of its
key order, validation, normalization and command-line syntax. The API schema (``app/schemas.py``), the ``hipp``
commands and the engine all go through :class:`Preference`.

Pure Python (no torch): the API imports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.hipp.errors import OptionError

KEYS = ("utility", "robustness", "compression")
EXAMPLE = "utility=0.5,robustness=0.3,compression=0.2"


class PreferenceError(OptionError, ValueError):
    """A preference that cannot be used; a ValueError too, so that pydantic reports it as a 422."""


@dataclass(frozen=True)
class Preference:
    """Non-negative, finite, not all zero; normalized to sum to 1. Missing keys are 0."""

    utility: float
    robustness: float
    compression: float

    @classmethod
    def from_values(cls, values: Sequence[object]) -> Preference:
        """Three weights in ``KEYS`` order."""
        if len(values) != len(KEYS):
            raise PreferenceError(f"the preference needs {len(KEYS)} values ({', '.join(KEYS)}), got {len(values)}")
        weights = []
        for key, value in zip(KEYS, values, strict=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PreferenceError(f"{key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise PreferenceError(f"{key} must be a finite number (got NaN or infinity)")
            if value < 0:
                raise PreferenceError(f"{key} must be >= 0 (got {value}); preference weights are non-negative")
            weights.append(float(value))
        total = sum(weights)
        if total <= 0:
            raise PreferenceError(
                f"preference weights are all zero; give at least one a positive weight, e.g. {EXAMPLE}")
        if not math.isfinite(total):
            raise PreferenceError("preference weights are too large; use weights that sum to 1")
        return cls(*(w / total for w in weights))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Preference:
        """``{"utility": ..., ...}``; unknown keys are refused, missing ones are 0."""
        check_keys(mapping)
        return cls.from_values([mapping.get(key, 0.0) for key in KEYS])

    @classmethod
    def parse(cls, text: str) -> Preference:
        """The command line's syntax, ``utility=0.5,robustness=0.3,compression=0.2`` (keys may be left out), or a
        JSON object. Three bare numbers (``0.5,0.3,0.2``, the older ``hipp plan`` form) are read in ``KEYS`` order."""
        text = text.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise PreferenceError(f"the preference is not valid JSON ({exc}); e.g. {EXAMPLE}") from None
            if not isinstance(data, dict):
                raise PreferenceError(f"a JSON preference must be an object, e.g. {json.dumps(dict.fromkeys(KEYS, 1))}")
            return cls.from_mapping(data)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if parts and all("=" not in p for p in parts):
            return cls.from_values([_number(p, p) for p in parts])
        mapping: dict[str, object] = {}
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep:
                raise PreferenceError(f"expected key=value in {part!r}; write the preference as {EXAMPLE}")
            mapping[key.strip()] = _number(value, key.strip())
        return cls.from_mapping(mapping)

    def as_dict(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in KEYS}

    def as_list(self) -> list[float]:
        return [getattr(self, key) for key in KEYS]

    def __str__(self) -> str:
        return ",".join(f"{key}={value:.4g}" for key, value in self.as_dict().items())


def check_keys(keys: object) -> None:
    """Refuse keys other than ``KEYS`` with a message that lists the allowed ones."""
    unknown = sorted(set(keys) - set(KEYS))  # type: ignore[call-overload]
    if unknown:
        raise PreferenceError(f"unknown preference key(s) {unknown}; use only {list(KEYS)}")


def _number(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PreferenceError(f"{key}: {text.strip()!r} is not a number; write the preference as {EXAMPLE}") from None
