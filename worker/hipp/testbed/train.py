"""Staged from-scratch training of the testbed VLM (the recipe in shared/design/testbed.md).

Stage 1 trains the vision tower alone with auxiliary heads on the features LLaVA selects (per-patch coverage;
presence, per-category count and side on the class token). Stage 2 trains the whole LLaVA on question
answering with every answer token supervised and the stage-1 heads kept as an auxiliary loss: single-turn
first, then several questions about one image as turns. The run logs held-out metrics and checkpoints
periodically, so a partial run is usable, and exports fp16 weights with the processor at the end.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from worker.hipp.data.world import CATEGORIES, CATEGORY_NAMES, IMAGE_SIZE, Scene, coverage_mask, generate_scenes, render
from worker.hipp.evaluation.runner import pope_predictions, sqa_predictions
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.pope import ObjectStats
from worker.hipp.evaluation.tasks.scienceqa import OPTIONS, SqaProblem
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.recovery.schedule import warmup_cosine
from worker.hipp.testbed.model import TEXT_LAYERS, TEXT_WIDTH, VISION_WIDTH, build_model
from worker.hipp.testbed.tokenizer import (
    BOS,
    EOS,
    IMAGE,
    IMAGE_MEAN,
    IMAGE_STD,
    NUM_IMAGE_TOKENS,
    PAD,
    PATCH_SIZE,
    build_processor,
)

N_CAT = len(CATEGORY_NAMES)
MAX_COUNT = 3


@dataclass
class TrainConfig:
    """Everything that determines a run; written next to the checkpoints and into the model card."""

    seed: int = 0
    pope_images: int = 24000
    sqa_problems: int = 24000
    stage1_steps: int = 1500
    stage2_steps: int = 3000
    multiturn_from: int = 3000  # single-turn throughout by default (17 image tokens: turns save little)
    turns: int = 3
    batch: int = 64
    stage1_lr: float = 2e-3
    stage2_lr: float = 1e-3
    vision_lr_scale: float = 0.3
    aux_weight: float = 0.3
    align_weight: float = 0.5
    probe_weight: float = 1.0
    text_layers: int = TEXT_LAYERS  # decoder depth (the family's deeper testbed uses 12)
    probe_layer: int | None = None  # hidden state after this many decoder layers (None: a third of the depth)
    sqa_share: float = 0.5
    # Relative sampling weights of the ScienceQA kinds in stage 2: count and side need more practice than
    # presence (their answers go through the option list, not just the named object).
    sqa_kind_weights: dict[str, float] = field(
        default_factory=lambda: {"presence": 1.0, "count": 1.5, "side": 1.5}
    )
    option_weight: float = 1.0
    option_layer: int | None = None  # hidden state after this many decoder layers (None: two thirds of the depth)
    warmup: int = 100
    eval_every: int = 300
    # Wall-clock budgets: when set, a stage runs until its budget is spent and its schedule follows elapsed
    # time instead of steps (the CPUs here are shared, so a step count cannot be sized in advance).
    stage1_minutes: float | None = None
    stage2_minutes: float | None = None
    eval_every_minutes: float = 6.0
    val_images: int = 300
    val_problems: int = 450
    resume: str | None = None  # a saved model to continue stage 2 from (stage 1 is then skipped)
    threads: int = 1  # one thread degrades gracefully when other jobs share the two cores
    extra: dict[str, str] = field(default_factory=dict)


def probe_layers(cfg: TrainConfig) -> tuple[int, int]:
    """Decoder depths of the name-token and option-correctness probes: the same relative depth at any size."""
    name = cfg.probe_layer if cfg.probe_layer is not None else cfg.text_layers // 3
    option = cfg.option_layer if cfg.option_layer is not None else (2 * cfg.text_layers) // 3
    return name, option


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Pool:
    """Training images rendered once, with their auxiliary targets and (for ScienceQA scenes) a problem."""

    scenes: list[Scene]
    problems: list[SqaProblem | None]
    images: torch.Tensor  # uint8 [N, 3, H, W]
    presence: torch.Tensor  # float [N, C]
    counts: torch.Tensor  # long [N, C], clipped to MAX_COUNT
    side: torch.Tensor  # long [N, C]: 0 left, 1 right, -100 undefined
    patches: torch.Tensor  # uint8 [N, P, C]
    sqa_index: list[int] = field(default_factory=list)  # rows that carry a ScienceQA problem

    def __post_init__(self) -> None:
        self.sqa_index = [i for i, p in enumerate(self.problems) if p is not None]

    def sqa_rows_by_kind(self) -> dict[str, list[int]]:
        rows: dict[str, list[int]] = {}
        for i in self.sqa_index:
            problem = self.problems[i]
            assert problem is not None
            rows.setdefault(problem.kind, []).append(i)
        return rows


def _targets(scene: Scene) -> tuple[list[float], list[int], list[int], list[list[int]]]:
    presence = [0.0] * N_CAT
    counts = [0] * N_CAT
    side = [-100] * N_CAT
    for c in scene.categories:
        i = CATEGORY_NAMES.index(c)
        presence[i] = 1.0
        counts[i] = min(scene.count(c), MAX_COUNT)
    for c in scienceqa.side_candidates(scene):
        obj = next(o for o in scene.objects if o.category == c)
        side[CATEGORY_NAMES.index(c)] = 0 if obj.centre_x < IMAGE_SIZE / 2 else 1
    cells = coverage_mask(scene, PATCH_SIZE)
    patches = [[1 if name in cell else 0 for name in CATEGORY_NAMES] for cell in cells]
    return presence, counts, side, patches


def build_pool(scenes: Sequence[Scene], problems: Sequence[SqaProblem | None], report: Reporter) -> Pool:
    images = np.zeros((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    presence, counts, side, patches = [], [], [], []
    for i, scene in enumerate(report.track(scenes, message="render")):
        images[i] = np.asarray(render(scene))
        p, c, s, m = _targets(scene)
        presence.append(p)
        counts.append(c)
        side.append(s)
        patches.append(m)
    return Pool(
        list(scenes),
        list(problems),
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(presence),
        torch.tensor(counts),
        torch.tensor(side),
        torch.tensor(patches, dtype=torch.uint8),
    )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to pixel values exactly as the processor makes them (rescale, then mean/std)."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class AuxHeads(nn.Module):
    """Linear probes on the vision features: class token -> presence/count/side, patch -> coverage."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.presence = nn.Linear(width, N_CAT)
        self.count = nn.Linear(width, N_CAT * (MAX_COUNT + 1))
        self.side = nn.Linear(width, N_CAT * 2)
        self.patch = nn.Linear(width, N_CAT)

    def loss(self, hidden: torch.Tensor, pool: Pool, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        h = self.norm(hidden)
        cls, patches = h[:, 0], h[:, 1:]
        bce = nn.functional.binary_cross_entropy_with_logits
        presence_logits = self.presence(cls)
        loss = bce(presence_logits, pool.presence[idx])
        count_logits = self.count(cls).view(-1, MAX_COUNT + 1)
        loss = loss + nn.functional.cross_entropy(count_logits, pool.counts[idx].view(-1))
        side_target = pool.side[idx].view(-1)
        if (side_target >= 0).any():
            loss = loss + nn.functional.cross_entropy(self.side(cls).view(-1, 2), side_target, ignore_index=-100)
        loss = loss + bce(self.patch(patches), pool.patches[idx].float())
        with torch.no_grad():
            f1 = _f1(presence_logits > 0, pool.presence[idx] > 0.5)
        return loss, f1


def _f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = (pred & truth).sum().item()
    denom = pred.sum().item() + truth.sum().item()
    return 2 * tp / denom if denom else 0.0


# -------------------------------------------------------------------------------------------- questions


def sample_pope_turn(scene: Scene, rng: random.Random, stats: ObjectStats) -> tuple[str, str]:
    """A balanced training POPE question. Negatives are drawn in proportion to frequency or co-occurrence
    (not the evaluation's top-k), so training does not drill exactly the evaluation's hard negatives."""
    present = scene.categories
    if rng.random() < 0.5:
        return pope.prompt_text(pope.question_text(rng.choice(present))), "Yes"
    absent = [c for c in CATEGORY_NAMES if c not in present]
    r = rng.random()
    if r < 0.4:
        weights = [1.0] * len(absent)
    elif r < 0.7:
        weights = [stats.frequency[c] + 1.0 for c in absent]
    else:
        weights = [sum(stats.cooccurrence.get(p, Counter())[c] for p in present) + 1.0 for c in absent]
    category = rng.choices(absent, weights=weights)[0]
    return pope.prompt_text(pope.question_text(category)), "No"


def sqa_turn(problem: SqaProblem) -> tuple[str, str]:
    return scienceqa.prompt_text(problem.question, problem.choices, problem.hint), OPTIONS[problem.answer]


class Encoder:
    """Builds token ids and labels for (prompt, answer) turns in the chat template's exact token layout."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.bos = self._id(BOS)
        self.eos = self._id(EOS)
        self.pad = self._id(PAD)
        self.image = self._id(IMAGE)

    def _id(self, token: str) -> int:
        found = self.tok.convert_tokens_to_ids(token)
        assert isinstance(found, int)
        return found

    def words(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self.cache[text]

    def encode(self, turns: Sequence[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
        """``answer=None`` on the last turn leaves the sequence open at the generation prompt."""
        ids, labels, _ = self.encode_with_offsets(turns)
        return ids, labels

    def encode_with_offsets(
        self, turns: Sequence[tuple[str, str | None]]
    ) -> tuple[list[int], list[int], list[int]]:
        """Like :meth:`encode`, plus the position where each turn's prompt text starts."""
        ids = [self.bos, *self.words("USER:"), *[self.image] * NUM_IMAGE_TOKENS]
        labels = [-100] * len(ids)
        offsets = []
        for i, (prompt, answer) in enumerate(turns):
            offsets.append(len(ids) if i == 0 else len(ids) + len(self.words("USER:")))
            head = self.words(prompt + " ASSISTANT:") if i == 0 else self.words(f"USER: {prompt} ASSISTANT:")
            ids += head
            labels += [-100] * len(head)
            if answer is not None:
                tail = [*self.words(answer), self.eos]
                ids += tail
                labels += tail
        return ids, labels, offsets

    def option_ends(self, problem: SqaProblem) -> list[int]:
        """Position of each option's last token, relative to the start of the problem's prompt text.

        The prompt with options up to ``k`` is the full prompt's prefix plus the closing instruction, and the
        word-level tokenizer splits on whitespace and punctuation, so token counts of those prompts give the
        positions without a second copy of the prompt layout.
        """
        instruction = len(self.words(scienceqa.INSTRUCTION))
        prompts = [scienceqa.prompt_text(problem.question, problem.choices[: k + 1], problem.hint)
                   for k in range(len(problem.choices))]
        return [len(self.words(prompt)) - instruction - 1 for prompt in prompts]

    def batch(self, seqs: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded batch (training and last-position scoring both use the last real token)."""
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), self.pad)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- training


#: The testbed recipe's cosine ends at 5% of the peak LR.
LR_FLOOR = 0.05


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """The engine's warmup-cosine schedule with the recipe's floor."""
    return warmup_cosine(step, progress, warmup, LR_FLOOR)


class Schedule:
    """Progress of a stage, by steps or, when ``minutes`` is set, by wall-clock time."""

    def __init__(self, steps: int, minutes: float | None, warmup: int) -> None:
        self.steps, self.minutes, self.warmup = steps, minutes, warmup
        self.start = time.time()

    def elapsed_minutes(self) -> float:
        return (time.time() - self.start) / 60

    def progress(self, step: int) -> float:
        if self.minutes is not None:
            return self.elapsed_minutes() / self.minutes
        return (step - self.warmup) / max(1, self.steps - self.warmup)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0 if self.minutes is not None else step >= self.steps

    def lr(self, step: int) -> float:
        return lr_factor(step, self.progress(step), self.warmup)


@dataclass
class ValSet:
    pope: dict[str, list[tuple[Scene, str, str]]]  # split -> (scene, question, label)
    sqa: list[tuple[Scene, SqaProblem]]


def build_val(cfg: TrainConfig) -> ValSet:
    """Held-out images (their own random streams) for the periodic metrics."""
    scenes = generate_scenes(cfg.seed, cfg.val_images, "trainval", min_categories=3)
    by_id = {s.image_id: s for s in scenes}
    out: dict[str, list[tuple[Scene, str, str]]] = {}
    for split in pope.SPLITS:
        qs = pope.build_split(scenes, split, cfg.seed)
        out[split] = [(by_id[q.image], q.text, q.label) for q in qs]
    sqa = scienceqa.generate_problems(cfg.seed, cfg.val_problems, "trainval", ObjectStats.from_scenes(scenes))
    return ValSet(out, sqa)


@torch.no_grad()
def last_logits(
    model: LlavaForConditionalGeneration, enc: Encoder, items: Sequence[tuple[Scene, str]], batch: int = 128
) -> torch.Tensor:
    """Next-token logits at the generation prompt for each (scene, prompt)."""
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        b = enc.batch([enc.encode([(prompt, None)]) for _, prompt in chunk])
        pixels = normalise(torch.stack([torch.from_numpy(np.array(render(s))).permute(2, 0, 1) for s, _ in chunk]))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pixels).logits
        last = b["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(chunk)), last])
    return torch.cat(out)


def quick_eval(model: LlavaForConditionalGeneration, enc: Encoder, val: ValSet, limit: int) -> dict[str, float]:
    """Balanced accuracy / yes-ratio per POPE split and SQA accuracy from first-token logits."""
    model.eval()
    yes, no = enc.words("Yes")[0], enc.words("No")[0]
    metrics: dict[str, float] = {}
    for split, rows in val.pope.items():
        rows = rows[:limit]
        logits = last_logits(model, enc, [(s, pope.prompt_text(q)) for s, q, _ in rows])
        preds = pope_predictions(logits, [[yes], [no]])
        m = pope.compute_metrics(preds, [lab for _, _, lab in rows])
        metrics[f"{split}_bacc"] = round(m.balanced_accuracy, 4)
        metrics[f"{split}_yes"] = round(m.yes_ratio, 3)
    problems = [p for _, p in val.sqa]
    logits = last_logits(model, enc, [(s, sqa_turn(p)[0]) for s, p in val.sqa])
    choices = sqa_predictions(logits, [[enc.words(x)[0]] for x in OPTIONS], problems)
    sm = scienceqa.compute_metrics(choices, problems)
    metrics["sqa"] = round(sm.accuracy, 4)
    for kind, (c, t) in sm.by_kind.items():
        metrics[f"sqa_{kind}"] = round(c / t, 3)
    model.train()
    return metrics


class VisionCapture:
    """Forward hook that keeps the vision tower's last hidden state (what LLaVA feeds the projector)."""

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        self.hidden: torch.Tensor | None = None
        model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        self.hidden = output.last_hidden_state  # type: ignore[attr-defined]


class Alignment(nn.Module):
    """Ties image tokens to words: the projected class token should score high against the input embedding of
    every category present, and each projected patch against the categories covering it.

    Without it the decoder must discover on its own that the word "cup" and the cup's image features belong
    together; from scratch on shared CPUs that search sat at the answer prior for hundreds of steps. With it,
    one attention head matching a word to similar image tokens is enough to ground the answer.
    """

    def __init__(self, model: LlavaForConditionalGeneration, name_ids: list[int]) -> None:
        super().__init__()
        self.name_ids = name_ids
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.bias = nn.Parameter(torch.tensor(-2.0))
        self.projected: torch.Tensor | None = None
        self.embeddings = model.get_input_embeddings()
        model.model.multi_modal_projector.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        assert isinstance(output, torch.Tensor)
        self.projected = output

    def loss(self, pool: Pool, idx: torch.Tensor) -> torch.Tensor:
        assert self.projected is not None
        feats = self.projected.view(len(idx), -1, self.projected.shape[-1])
        table = self.embeddings.weight
        assert isinstance(table, torch.Tensor)
        words = table[self.name_ids]
        logits = feats @ words.T * self.scale + self.bias
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(logits[:, 0], pool.presence[idx]) + bce(logits[:, 1:], pool.patches[idx].float())


class NameProbe(nn.Module):
    """Probes the decoder at every category-name token (singular or plural) of the prompt: is that object in
    the image, how many are there, which side is it on.

    This teaches the first decoder layers to look up the named object among the image tokens right where the
    name is (one attention hop); the answer position then only has to read it from the name's position. Without
    it the run sat at the answer prior: both hops had to be found at once from the answer loss alone.
    """

    def __init__(self, width: int, token_to_category: torch.Tensor, layer: int) -> None:
        super().__init__()
        self.token_to_category = token_to_category
        self.layer = layer
        self.norm = nn.LayerNorm(width)
        self.presence = nn.Linear(width, 1)
        self.count = nn.Linear(width, MAX_COUNT + 1)
        self.side = nn.Linear(width, 2)

    def loss(self, hidden_states: Sequence[torch.Tensor], input_ids: torch.Tensor, pool: Pool, rows: torch.Tensor
             ) -> torch.Tensor:
        category = self.token_to_category[input_ids]
        batch_index, position = torch.nonzero(category >= 0, as_tuple=True)
        if len(batch_index) == 0:
            return hidden_states[0].sum() * 0.0
        cats = category[batch_index, position]
        image_rows = rows[batch_index]
        h = self.norm(hidden_states[self.layer][batch_index, position])
        loss = nn.functional.binary_cross_entropy_with_logits(
            self.presence(h).squeeze(-1), pool.presence[image_rows, cats]
        )
        loss = loss + nn.functional.cross_entropy(self.count(h), pool.counts[image_rows, cats])
        side = pool.side[image_rows, cats]
        if (side >= 0).any():
            loss = loss + nn.functional.cross_entropy(self.side(h), side, ignore_index=-100)
        return loss


class OptionProbe(nn.Module):
    """Probes the decoder at the last token of every lettered option: is this option the right answer?

    Choosing a letter takes two steps after the object is found: compare each option with what was seen (the
    side, the count), then copy the letter in front of the winning option. Supervising the first step where
    the option is written leaves the answer position only the copy. Without it, side and count questions
    (whose options are shuffled or fixed words, not object names) stayed near chance while presence was learnt.
    """

    def __init__(self, width: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm = nn.LayerNorm(width)
        self.correct = nn.Linear(width, 1)

    def loss(self, hidden_states: Sequence[torch.Tensor], marks: torch.Tensor) -> torch.Tensor:
        """``marks``: rows of (batch index, position, 1 if that option is the answer else 0)."""
        if len(marks) == 0:
            return hidden_states[0].sum() * 0.0
        h = self.norm(hidden_states[self.layer][marks[:, 0], marks[:, 1]])
        return nn.functional.binary_cross_entropy_with_logits(self.correct(h).squeeze(-1), marks[:, 2].float())


def name_token_table(enc: Encoder, vocab_size: int) -> torch.Tensor:
    """Vocabulary id -> category index (-1 for words that are not a category name or its plural)."""
    table = torch.full((vocab_size,), -1, dtype=torch.long)
    for i, category in enumerate(CATEGORIES):
        for word in {category.name, category.plural}:
            ids = enc.words(word)
            if len(ids) == 1:
                table[ids[0]] = i
    return table


def _log(path: Path, record: dict[str, object], report: Reporter) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    report.log(json.dumps(record))


def train_stage1(
    model: LlavaForConditionalGeneration, heads: AuxHeads, pool: Pool, cfg: TrainConfig, log: Path, report: Reporter
) -> int:
    vision = model.model.vision_tower
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = Schedule(cfg.stage1_steps, cfg.stage1_minutes, cfg.warmup)
    report.stage("stage1", "vision tower with auxiliary heads")
    step = 0
    while not schedule.done(step):
        report.check()
        for g in opt.param_groups:
            g["lr"] = cfg.stage1_lr * schedule.lr(step)
        idx = torch.randint(0, len(pool.scenes), (cfg.batch,), generator=gen)
        hidden = vision(pixel_values=normalise(pool.images[idx])).last_hidden_state
        loss, f1 = heads.loss(hidden, pool, idx)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            rec = {"stage": 1, "step": step, "loss": round(loss.item(), 4), "presence_f1": round(f1, 3)}
            _log(log, {**rec, "minutes": round(schedule.elapsed_minutes(), 2)}, report)
        step += 1
    _log(log, {"stage": 1, "steps": step, "minutes": round(schedule.elapsed_minutes(), 2)}, report)
    return step


class SqaSampler:
    """Draws ScienceQA rows of the pool with the configured weight per problem kind."""

    def __init__(self, pool: Pool, weights: dict[str, float]) -> None:
        self.rows = pool.sqa_rows_by_kind()
        self.kinds = list(self.rows)
        self.weights = [weights.get(kind, 1.0) for kind in self.kinds]

    def draw(self, rng: random.Random) -> int:
        kind = rng.choices(self.kinds, weights=self.weights)[0]
        return rng.choice(self.rows[kind])


def _stage2_batch(
    pool: Pool,
    cfg: TrainConfig,
    rng: random.Random,
    stats: ObjectStats,
    enc: Encoder,
    multiturn: bool,
    sampler: SqaSampler,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch, the pool row of each sequence, and the option marks (batch index, position, is answer)."""
    seqs, rows, marks = [], [], []
    for b in range(cfg.batch):
        problem: SqaProblem | None = None
        if multiturn:
            i = sampler.draw(rng)
            problem = pool.problems[i]
            assert problem is not None
            turns = [sqa_turn(problem)] + [sample_pope_turn(pool.scenes[i], rng, stats) for _ in range(cfg.turns - 1)]
            rng.shuffle(turns)
        elif rng.random() < cfg.sqa_share:
            i = sampler.draw(rng)
            problem = pool.problems[i]
            assert problem is not None
            turns = [sqa_turn(problem)]
        else:
            i = rng.randrange(len(pool.scenes))
            turns = [sample_pope_turn(pool.scenes[i], rng, stats)]
        ids, labels, offsets = enc.encode_with_offsets([(p, a) for p, a in turns])
        if problem is not None:
            start = offsets[turns.index(sqa_turn(problem))]  # where the shuffle put the problem's turn
            marks += [[b, start + end, int(k == problem.answer)] for k, end in enumerate(enc.option_ends(problem))]
        seqs.append((ids, labels))
        rows.append(i)
    return enc.batch(seqs), torch.tensor(rows), torch.tensor(marks, dtype=torch.long).view(-1, 3)


def train_stage2(
    model: LlavaForConditionalGeneration,
    heads: AuxHeads,
    pool: Pool,
    stats: ObjectStats,
    enc: Encoder,
    val: ValSet,
    cfg: TrainConfig,
    work: Path,
    report: Reporter,
) -> dict[str, float]:
    vision_params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    vision_ids = {id(p) for p in vision_params}
    align = Alignment(model, [enc.words(name)[0] for name in CATEGORY_NAMES])
    probe_layer, option_layer = probe_layers(cfg)
    probe = NameProbe(TEXT_WIDTH, name_token_table(enc, len(enc.tok)), probe_layer)
    options = OptionProbe(TEXT_WIDTH, option_layer)
    sampler = SqaSampler(pool, cfg.sqa_kind_weights)
    other = [p for p in model.parameters() if id(p) not in vision_ids] + [align.scale, align.bias]
    other += list(probe.parameters()) + list(options.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": other, "scale": 1.0},
            {"params": vision_params, "scale": cfg.vision_lr_scale},
        ],
        lr=cfg.stage2_lr,
        betas=(0.9, 0.98),
        weight_decay=0.01,
    )
    capture = VisionCapture(model)
    rng = random.Random(f"{cfg.seed}:stage2")
    log = work / "train_log.jsonl"
    schedule = Schedule(cfg.stage2_steps, cfg.stage2_minutes, cfg.warmup)
    last_eval = time.time()
    metrics: dict[str, float] = {}
    report.stage("stage2", "LLaVA question answering")
    model.train()
    step = 0
    while not schedule.done(step):
        report.check()
        for g in opt.param_groups:
            g["lr"] = cfg.stage2_lr * g["scale"] * schedule.lr(step)
        batch, rows, marks = _stage2_batch(
            pool, cfg, rng, stats, enc, multiturn=step >= cfg.multiturn_from, sampler=sampler
        )
        out = model(**batch, pixel_values=normalise(pool.images[rows]), output_hidden_states=True)
        assert capture.hidden is not None
        aux, f1 = heads.loss(capture.hidden, pool, rows)
        aligned = align.loss(pool, rows)
        probed = probe.loss(out.hidden_states, batch["input_ids"], pool, rows)
        optioned = options.loss(out.hidden_states, marks)
        loss = (
            out.loss
            + cfg.aux_weight * aux
            + cfg.align_weight * aligned
            + cfg.probe_weight * probed
            + cfg.option_weight * optioned
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            rec = {"stage": 2, "step": step, "qa_loss": round(out.loss.item(), 4), "aux": round(aux.item(), 4),
                   "align": round(aligned.item(), 4), "probe": round(probed.item(), 4),
                   "option": round(optioned.item(), 4)}
            _log(log, {**rec, "presence_f1": round(f1, 3), "minutes": round(schedule.elapsed_minutes(), 2)}, report)
        step += 1
        if _eval_due(cfg, step, last_eval):
            metrics = _evaluate_and_save(model, enc, val, work, step, log, report)
            last_eval = time.time()
    metrics = _evaluate_and_save(model, enc, val, work, step, log, report)
    return {**metrics, "steps": step}


def _eval_due(cfg: TrainConfig, step: int, last_eval: float) -> bool:
    if cfg.stage2_minutes is not None:
        return time.time() - last_eval >= cfg.eval_every_minutes * 60
    return step % cfg.eval_every == 0


def _evaluate_and_save(
    model: LlavaForConditionalGeneration, enc: Encoder, val: ValSet, work: Path, step: int, log: Path, report: Reporter
) -> dict[str, float]:
    metrics = quick_eval(model, enc, val, limit=400)
    _log(log, {"stage": 2, "step": step, "eval": metrics}, report)
    model.save_pretrained(work / "checkpoint")
    return metrics


def export(model: LlavaForConditionalGeneration, out: Path) -> None:
    """fp16 safetensors plus the processor files, loadable with the Auto classes offline."""
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    model.float()
    build_processor().save_pretrained(out)


def train(cfg: TrainConfig, out: Path, work: Path, report: Reporter = SILENT) -> dict[str, object]:
    """Run both stages and export to ``out``; checkpoints and the log go to ``work``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.probe_layer, cfg.option_layer = probe_layers(cfg)  # the card and the log name the resolved depths
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = work / "train_log.jsonl"
    t0 = time.time()
    report.stage("data", "generating and rendering the training split")
    pope_scenes = generate_scenes(cfg.seed, cfg.pope_images, "train")
    stats = ObjectStats.from_scenes(pope_scenes)
    sqa = scienceqa.generate_problems(cfg.seed, cfg.sqa_problems, "train", stats)
    pool = build_pool(
        pope_scenes + [s for s, _ in sqa], [None] * len(pope_scenes) + [p for _, p in sqa], report
    )
    val = build_val(cfg)
    processor = build_processor()
    enc = Encoder(processor.tokenizer)
    if cfg.resume:
        model = LlavaForConditionalGeneration.from_pretrained(cfg.resume).float()
    else:
        model = build_model(dict(processor.tokenizer.get_vocab()), cfg.text_layers)
    heads = AuxHeads(VISION_WIDTH)
    _log(log, {"data_minutes": round((time.time() - t0) / 60, 2), "params": model.num_parameters()}, report)
    stage1_steps = 0 if cfg.resume else train_stage1(model, heads, pool, cfg, log, report)
    metrics = train_stage2(model, heads, pool, stats, enc, val, cfg, work, report)
    minutes = (time.time() - t0) / 60
    export(model, out)
    summary: dict[str, object] = {
        "minutes": round(minutes, 1),
        "stage1_steps": stage1_steps,
        "val": metrics,
        "config": asdict(cfg),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def time_steps(cfg: TrainConfig, steps: int = 5) -> dict[str, float]:
    """Seconds per step of each stage on a tiny pool (used to size a run to the time budget)."""
    torch.set_num_threads(cfg.threads)
    scenes = generate_scenes(cfg.seed, 256, "timing")
    sqa = scienceqa.generate_problems(cfg.seed, 256, "timing", ObjectStats.from_scenes(scenes))
    pool = build_pool(scenes + [s for s, _ in sqa], [None] * len(scenes) + [p for _, p in sqa], SILENT)
    processor = build_processor()
    enc = Encoder(processor.tokenizer)
    model = build_model(dict(processor.tokenizer.get_vocab()), cfg.text_layers)
    heads = AuxHeads(VISION_WIDTH)
    stats = ObjectStats.from_scenes(scenes)
    result: dict[str, float] = {}
    for name, fn in _timing_fns(model, heads, pool, stats, enc, cfg).items():
        fn()
        t = time.time()
        for _ in range(steps):
            fn()
        result[name] = (time.time() - t) / steps
    return result


def _timing_fns(
    model: LlavaForConditionalGeneration,
    heads: AuxHeads,
    pool: Pool,
    stats: ObjectStats,
    enc: Encoder,
    cfg: TrainConfig,
) -> dict[str, Callable[[], None]]:
    rng = random.Random(0)
    sampler = SqaSampler(pool, cfg.sqa_kind_weights)
    capture = VisionCapture(model)

    def stage1() -> None:
        idx = torch.randint(0, len(pool.scenes), (cfg.batch,))
        hidden = model.model.vision_tower(pixel_values=normalise(pool.images[idx])).last_hidden_state
        heads.loss(hidden, pool, idx)[0].backward()

    def stage2(multiturn: bool) -> Callable[[], None]:
        def run() -> None:
            batch, rows, _ = _stage2_batch(pool, cfg, rng, stats, enc, multiturn, sampler)
            out = model(**batch, pixel_values=normalise(pool.images[rows]))
            assert capture.hidden is not None
            (out.loss + heads.loss(capture.hidden, pool, rows)[0]).backward()

        return run

    return {"stage1": stage1, "stage2_single": stage2(False), "stage2_multi": stage2(True)}
