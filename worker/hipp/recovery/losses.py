"""Recovery's losses: cross-entropy on the answer tokens, distillation from the dense teacher (temperature-softened
KL, normalized per-layer hidden-state MSE) and their weighted sum for one batch; plus the check that a teacher
reads the same inputs and vocabulary as the student, which distillation needs.

Imports ``models`` and this room's ``config`` and ``conversations``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.hipp.errors import OptionError
from worker.hipp.models.loading import LoadedModel
from worker.hipp.recovery.config import RecoveryConfig
from worker.hipp.recovery.conversations import IGNORE_INDEX


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


def step_loss(
    model: Any, teacher: LoadedModel | None, batch: dict[str, torch.Tensor], config: RecoveryConfig,
    image_token_id: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch and its parts (rounded, for the log)."""
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
