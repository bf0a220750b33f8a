"""What a recovery run is told and what it reports: the methods, the decoder linears it may train, the validated
:class:`RecoveryConfig` (with each method's defaults, :class:`ResolvedWeights`) and the :class:`RecoveryResult`.

Imports only ``errors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from worker.hipp.errors import OptionError

METHODS = ("lora", "kd", "lora+kd")
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KD_POSITIONS = ("answer", "text")


@dataclass(frozen=True)
class RecoveryConfig:
    """How to recover. Weights left ``None`` take the method's defaults (see :meth:`resolved`).

    ``steps`` and ``max_seconds`` are budgets: training stops at whichever is reached first (at least one is
    needed). A time budget makes the step count depend on the machine; a step budget is reproducible.
    """

    method: str = "lora"
    steps: int | None = 100
    max_seconds: float | None = None
    learning_rate: float | None = None
    batch_size: int = 8
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = LM_LINEARS
    ce_weight: float | None = None
    kd_weight: float | None = None
    hidden_weight: float = 0.0
    temperature: float = 2.0
    kd_positions: str = "text"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int | None = 1024
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"unknown recovery method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.steps is None and self.max_seconds is None:
            raise OptionError("give a budget: steps, max_seconds, or both")
        if self.steps is not None and self.steps < 0:
            raise OptionError(f"steps must be >= 0, got {self.steps}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise OptionError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.learning_rate is not None and not (0 < self.learning_rate < 1):
            raise OptionError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        for name in ("batch_size", "lora_rank", "log_every"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise OptionError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise OptionError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        unknown = [t for t in self.targets if t not in LM_LINEARS]
        if unknown or not self.targets:
            raise OptionError(
                f"targets must be a non-empty subset of {', '.join(LM_LINEARS)}; got {list(self.targets)}"
            )
        for name in ("ce_weight", "kd_weight", "hidden_weight", "weight_decay", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise OptionError(f"{name} must be >= 0, got {value}")
        if self.temperature <= 0:
            raise OptionError(f"temperature must be > 0, got {self.temperature}")
        if self.grad_clip <= 0:
            raise OptionError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.kd_positions not in KD_POSITIONS:
            raise OptionError(f"kd_positions must be one of {KD_POSITIONS}, got {self.kd_positions!r}")
        if self.max_length is not None and self.max_length < 8:
            raise OptionError(f"max_length must be >= 8 (or None), got {self.max_length}")
        if self.method == "lora" and (self.kd_weight or self.hidden_weight):
            raise OptionError("method 'lora' trains on cross-entropy only; use 'lora+kd' for distillation weights")
        r = self.resolved()
        if r.ce_weight == 0 and r.kd_weight == 0 and r.hidden_weight == 0:
            raise OptionError("every loss weight is 0: set ce_weight, kd_weight or hidden_weight above 0")

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "lora+kd")

    @property
    def needs_teacher(self) -> bool:
        r = self.resolved()
        return bool(r.kd_weight or r.hidden_weight)

    def resolved(self) -> ResolvedWeights:
        """The method's defaults filled in: LoRA learns faster than full weights, so gets a larger rate."""
        lr = self.learning_rate or (2e-3 if self.uses_lora else 2e-4)
        kd = self.kd_weight if self.kd_weight is not None else (0.0 if self.method == "lora" else 1.0)
        ce = self.ce_weight if self.ce_weight is not None else (1.0 if self.method == "lora" else 0.0)
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        return ResolvedWeights(lr, ce, kd, self.hidden_weight, alpha)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["resolved"] = asdict(self.resolved())
        return data


@dataclass(frozen=True)
class ResolvedWeights:
    learning_rate: float
    ce_weight: float
    kd_weight: float
    hidden_weight: float
    lora_alpha: float


@dataclass
class RecoveryResult:
    """What happened: steps taken, wall time, per-step losses (total and parts)."""

    steps: int
    seconds: float
    examples: int
    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    stopped_by: str = "steps"

    def mean_loss(self, first: bool, window: int = 10) -> float | None:
        """Mean of the first or last ``window`` losses (shrunk so the two windows never overlap)."""
        if not self.losses:
            return None
        window = max(1, min(window, len(self.losses) // 2))
        values = self.losses[:window] if first else self.losses[-window:]
        return sum(values) / len(values)

    def record(self, config: RecoveryConfig, teacher: str | None = None, data: str | None = None) -> dict[str, Any]:
        """A JSON-able summary for ``metrics.json``."""
        return {
            "method": config.method,
            "config": config.to_dict(),
            "teacher": teacher,
            "data": data,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "examples": self.examples,
            "stopped_by": self.stopped_by,
            "loss_first": _round(self.mean_loss(first=True)),
            "loss_last": _round(self.mean_loss(first=False)),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)
