"""Post-pruning recovery: LoRA on the language-model linears (merged back) and distillation from the dense model.

Three methods, one loop:

- ``lora``: LoRA adapters (peft) on the decoder's linears, trained on the answer tokens' cross-entropy, then
  merged with ``merge_and_unload`` so the result is the plain pruned architecture again;
- ``kd``: the decoder's linears themselves are trained to match the dense teacher (KL between temperature-
  softened next-token distributions, optionally plus a normalized MSE between every layer's hidden states);
- ``lora+kd``: LoRA adapters trained on the distillation loss (plus cross-entropy when ``ce_weight`` > 0).

The student keeps its pruned shapes (only existing weights change), so the recovered model exports through
``checkpoint.export_pruned`` exactly like a pruned one. The teacher runs under ``no_grad`` and is never in the
optimizer: it is not modified. :class:`RecoveryConfig` is the validated configuration; :func:`recover` the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.hipp.errors import HippError, OptionError
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.recovery.conversations import IGNORE_INDEX, Conversation, EncodedExample, collate, encode_all
from worker.hipp.recovery.schedule import warmup_cosine

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


# --- checks ------------------------------------------------------------------------------------------


def _vocab_size(loaded: LoadedModel) -> int:
    model: Any = loaded.model
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    return int(loaded.adapter.text_config.vocab_size)


def check_teacher(student: LoadedModel, teacher: LoadedModel) -> None:
    """The teacher must read the same inputs and predict over the same vocabulary as the student."""
    sv, tv = _vocab_size(student), _vocab_size(teacher)
    if sv != tv:
        raise OptionError(
            f"the teacher predicts over {tv} tokens but the student over {sv}: distillation needs the same "
            "vocabulary; pass the dense model the student was pruned from as the teacher"
        )
    s_tok = getattr(student.processor, "tokenizer", student.processor)
    t_tok = getattr(teacher.processor, "tokenizer", teacher.processor)
    if hasattr(s_tok, "get_vocab") and hasattr(t_tok, "get_vocab") and s_tok.get_vocab() != t_tok.get_vocab():
        raise OptionError(
            "the teacher's tokenizer has another vocabulary than the student's; pass the dense model the student "
            "was pruned from as the teacher"
        )
    if student.adapter.image_token_id != teacher.adapter.image_token_id:
        raise OptionError("the teacher uses another image token id than the student")
    if student.adapter.hidden_size != teacher.adapter.hidden_size:
        raise OptionError(
            f"the teacher's hidden size {teacher.adapter.hidden_size} differs from the student's "
            f"{student.adapter.hidden_size}"
        )
    if len(student.adapter.decoder_layers) != len(teacher.adapter.decoder_layers):
        raise OptionError("the teacher has another number of decoder layers than the student")


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


# --- losses ------------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised (answer) tokens."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def kd_positions(batch: dict[str, torch.Tensor], image_token_id: int, which: str) -> torch.Tensor:
    """Boolean ``[batch, seq-1]`` mask of the positions whose next-token distribution is distilled."""
    if which == "answer":
        return batch["labels"][:, 1:] != IGNORE_INDEX
    # Every position that predicts a real text token: prompt words too (more signal per example).
    nxt = batch["input_ids"][:, 1:]
    return batch["attention_mask"][:, 1:].bool() & (nxt != image_token_id)


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, x T^2 (Hinton et al.), mean over ``mask``."""
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_mse(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Per layer (embeddings excluded), MSE on real tokens divided by the teacher's mean square, averaged.

    The normalization keeps layers whose activations grow with depth from dominating the sum.
    """
    losses = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        s, t = hs[mask].float(), ht[mask].float()
        losses.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6))
    return torch.stack(losses).mean()


# --- the loop ----------------------------------------------------------------------------------------


#: Recovery's cosine ends at 10% of the peak LR.
LR_FLOOR = 0.1


class _Budget:
    """Steps and/or wall-clock seconds. The clock covers the whole call (data encoding included), so a time
    budget bounds what the caller waits; the learning-rate schedule follows the training part of it."""

    def __init__(self, config: RecoveryConfig) -> None:
        self.steps, self.seconds = config.steps, config.max_seconds
        self.start = self.train_start = time.perf_counter()

    def start_training(self) -> None:
        self.train_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        parts = []
        if self.steps is not None:
            parts.append(step / max(1, self.steps))
        if self.seconds is not None:
            left = self.start + self.seconds - self.train_start
            parts.append((time.perf_counter() - self.train_start) / max(left, 1e-3))
        return max(parts)

    def stop_reason(self, step: int) -> str | None:
        if self.steps is not None and step >= self.steps:
            return "steps"
        if self.seconds is not None and self.elapsed() >= self.seconds:
            return "time"
        return None


def _wrap_lora(loaded: LoadedModel, names: Sequence[str], config: RecoveryConfig) -> Any:
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


def _batches(
    examples: Sequence[EncodedExample], batch_size: int, generator: torch.Generator
) -> Any:
    """Endless shuffled epochs of example batches (a fixed permutation per epoch from the seeded generator)."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def recover(
    student: LoadedModel,
    conversations: Sequence[Conversation],
    config: RecoveryConfig,
    teacher: LoadedModel | None = None,
    reporter: Reporter = SILENT,
) -> RecoveryResult:
    """Train ``student`` (a physically pruned model) in place; LoRA is merged before this returns.

    ``student.model`` is replaced by the merged plain model when LoRA is used. The decoder's shapes are
    checked to be unchanged, and no peft module or key is left.
    """
    if config.needs_teacher and teacher is None:
        raise OptionError(f"method {config.method!r} distills from the dense model: pass a teacher")
    if teacher is not None and config.needs_teacher:
        if teacher.model is student.model:
            raise OptionError("the teacher is the student itself; load the dense model separately")
        check_teacher(student, teacher)
    else:
        teacher = None
    r = config.resolved()
    budget = _Budget(config)
    reporter.stage("recover-data", f"encoding {len(conversations)} conversations")
    examples = encode_all(student, conversations, config.max_length)
    shapes_before = decoder_shapes(student)
    requires_grad = {name: p.requires_grad for name, p in student.model.named_parameters()}
    linears = target_linears(student, config.targets)
    if not linears:
        raise OptionError("the model has no non-empty decoder linear among the targets to train")

    torch.manual_seed(config.seed)  # LoRA's A init and dropout masks
    generator = torch.Generator().manual_seed(config.seed)  # data order
    model: Any
    if config.uses_lora:
        model = _wrap_lora(student, list(linears), config)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model = student.model
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for lin in linears.values() for p in lin.parameters()]
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=r.learning_rate, weight_decay=config.weight_decay)
    pad_id = _pad_id(student)
    image_token_id = student.adapter.image_token_id
    budget.start_training()
    result = RecoveryResult(steps=0, seconds=0.0, examples=len(examples))
    reporter.stage("recover", f"{config.method}: {len(params)} tensors, {len(examples)} examples")
    total = config.steps
    reporter.progress(0, total, "recovery steps")
    model.train()
    try:
        batches = _batches(examples, config.batch_size, generator)
        step = 0
        while (reason := budget.stop_reason(step)) is None:
            reporter.check()
            factor = warmup_cosine(step, budget.progress(step), config.warmup_steps, LR_FLOOR)
            for group in optimizer.param_groups:
                group["lr"] = r.learning_rate * factor
            batch = _to_device(collate(next(batches), pad_id), student)
            loss, parts = _step_loss(model, teacher, batch, config, image_token_id)
            if not torch.isfinite(loss):
                raise OptionError(f"recovery diverged at step {step} (loss {loss.item()}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            result.losses.append(float(loss.item()))
            result.parts.append(parts)
            step += 1
            reporter.progress(step, total, "recovery steps")
            if step % config.log_every == 0:
                reporter.log(f"step {step}: loss {sum(result.losses[-config.log_every:]) / config.log_every:.4f}")
        result.stopped_by = reason
    finally:
        model.eval()
        if config.uses_lora:
            # Merge even when cancelled: the caller must never be left holding a peft-wrapped model.
            student.model = model.merge_and_unload()
        for name, p in student.model.named_parameters():
            p.requires_grad_(requires_grad.get(name, False))
            p.grad = None
    result.steps = step
    result.seconds = budget.elapsed()
    assert_plain_model(student.model)
    if decoder_shapes(student) != shapes_before:
        raise HippError("recovery changed the pruned decoder's shapes")
    return result


def _pad_id(loaded: LoadedModel) -> int:
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else getattr(tokenizer, "eos_token_id", 0) or 0)


def _to_device(batch: dict[str, torch.Tensor], loaded: LoadedModel) -> dict[str, torch.Tensor]:
    dtype = next(loaded.model.parameters()).dtype
    out = {k: v.to(loaded.device) for k, v in batch.items()}
    if "pixel_values" in out and torch.is_floating_point(out["pixel_values"]):
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _step_loss(
    model: Any, teacher: LoadedModel | None, batch: dict[str, torch.Tensor], config: RecoveryConfig,
    image_token_id: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    r = config.resolved()
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want_hidden = r.hidden_weight > 0
    out = model(**inputs, output_hidden_states=want_hidden)
    parts: dict[str, torch.Tensor] = {}
    if r.ce_weight:
        parts["ce"] = cross_entropy(out.logits, labels)
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher.model(**inputs, output_hidden_states=want_hidden)
        if r.kd_weight:
            mask = kd_positions(batch, image_token_id, config.kd_positions)
            parts["kd"] = kl_divergence(out.logits, t_out.logits, mask, config.temperature)
        if want_hidden:
            parts["hidden"] = hidden_mse(out.hidden_states, t_out.hidden_states, batch["attention_mask"].bool())
    weights = {"ce": r.ce_weight, "kd": r.kd_weight, "hidden": r.hidden_weight}
    loss = sum((weights[k] * v for k, v in parts.items()), torch.zeros((), device=out.logits.device))
    return loss, {k: round(float(v.detach()), 5) for k, v in parts.items()}
