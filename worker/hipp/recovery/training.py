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

Here: the loop (budget, data order, learning-rate schedule, optimizer steps, merge and checks). Elsewhere in the
room: ``config`` (configuration and result, re-exported here), ``trainable`` (target linears, LoRA wrapping, the
merge check), ``losses`` (cross-entropy, distillation, the teacher check), ``conversations`` (data, encoding).
Imports ``models`` and those modules.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from worker.hipp.errors import HippError, OptionError
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.recovery.config import LM_LINEARS as LM_LINEARS  # re-exported: callers import them from here
from worker.hipp.recovery.config import METHODS as METHODS
from worker.hipp.recovery.config import RecoveryConfig as RecoveryConfig
from worker.hipp.recovery.config import RecoveryResult as RecoveryResult
from worker.hipp.recovery.conversations import Conversation, EncodedExample, collate, encode_all
from worker.hipp.recovery.losses import check_teacher, step_loss
from worker.hipp.recovery.schedule import warmup_cosine
from worker.hipp.recovery.trainable import assert_plain_model, decoder_shapes, target_linears, trainable_model

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
    model, params = trainable_model(student, linears, config)
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
            loss, parts = step_loss(model, teacher, batch, config, image_token_id)
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
