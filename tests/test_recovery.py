"""Post-pruning recovery: LoRA merged back, distillation from an untouched teacher, export, CLI, bad options."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from worker.hipp.data.calibration import synthetic_samples
from worker.hipp.errors import OptionError
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan
from worker.hipp.recovery.conversations import (
    IGNORE_INDEX,
    Conversation,
    encode_conversation,
    load_llava_json,
    write_llava_json,
)
from worker.hipp.recovery.training import RecoveryConfig, recover


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: a second thread only adds synchronisation, which costs most on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def conversations(n: int = 32, seed: int = 3) -> list[Conversation]:
    """Image questions whose answer depends on the image a little (object count parity) and on the question."""
    out = []
    for i, sample in enumerate(synthetic_samples(n, seed=seed)):
        answer = "yes" if "red" in sample.question or i % 3 == 0 else "no"
        out.append(Conversation(((sample.question, answer),), sample.image, f"c{i}"))
    return out


def pruned(loaded, sparsity: float = 0.5) -> PruningPlan:
    plan = build_plan(loaded, sparsity, "wanda-sp")
    apply_plan(loaded.adapter, plan)
    return plan


def kept_shapes(plan: PruningPlan) -> list[tuple[int, int, int]]:
    return [(len(lp.heads), len(lp.kv_heads), len(lp.channels)) for lp in plan.layers]


def model_shapes(loaded) -> list[tuple[int, int, int]]:
    return [(la.num_heads, la.num_kv_heads, la.intermediate_size) for la in loaded.adapter.layers()]


def assert_no_peft(model) -> None:
    assert not [k for k in model.state_dict() if "lora_" in k]
    assert not [type(m).__module__ for m in model.modules() if type(m).__module__.startswith("peft")]


def test_lora_loss_falls_and_merge_leaves_the_plain_pruned_model(tiny_gqa):
    plan = pruned(tiny_gqa)
    before = {k: v.clone() for k, v in tiny_gqa.model.state_dict().items()}
    result = recover(tiny_gqa, conversations(), RecoveryConfig(method="lora", steps=20, seed=1))
    assert result.steps == 20 and result.stopped_by == "steps"
    assert result.mean_loss(first=False, window=5) < result.mean_loss(first=True, window=5)
    assert_no_peft(tiny_gqa.model)
    assert model_shapes(tiny_gqa) == kept_shapes(plan)
    after = tiny_gqa.model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # LoRA was merged into the decoder linears only: vision tower, projector, embeddings untouched.
    assert changed and all("language_model.layers." in k and k.endswith("proj.weight") for k in changed)


@pytest.mark.parametrize("method", ["kd", "lora+kd"])
def test_distillation_falls_and_never_modifies_the_teacher(tiny_gqa, method):
    from worker.hipp.models.loading import load_model

    teacher = load_model("tiny-llava")
    teacher_state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    plan = pruned(tiny_gqa)
    config = RecoveryConfig(method=method, steps=20, hidden_weight=0.5, ce_weight=0.5, seed=2)
    result = recover(tiny_gqa, conversations(), config, teacher=teacher)
    assert set(result.parts[0]) == {"ce", "kd", "hidden"}
    assert result.mean_loss(first=False, window=5) < result.mean_loss(first=True, window=5)
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    assert all(p.grad is None for p in teacher.model.parameters())
    assert_no_peft(tiny_gqa.model)
    assert model_shapes(tiny_gqa) == kept_shapes(plan)


def test_same_seed_gives_the_same_run():
    from worker.hipp.models.loading import load_model

    runs = []
    for _ in range(2):
        loaded = load_model("tiny-llava")
        pruned(loaded, 0.3)
        result = recover(loaded, conversations(16), RecoveryConfig(method="lora", steps=4, batch_size=4, seed=5))
        runs.append((result.losses, loaded.model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_time_budget_stops_the_run(tiny_gqa):
    pruned(tiny_gqa)
    result = recover(tiny_gqa, conversations(8), RecoveryConfig(method="lora", steps=None, max_seconds=1.5))
    assert result.stopped_by == "time" and result.steps >= 1 and result.seconds >= 1.5


def test_cancelling_stops_the_loop_and_still_leaves_a_merged_model(tiny_gqa):
    from worker.hipp.progress import Cancelled, Reporter

    class StopAfterThree(Reporter):
        def __init__(self) -> None:
            self.done = 0

        def progress(self, done: int, total: int | None = None, message: str = "") -> None:
            self.done = done

        def should_stop(self) -> bool:
            return self.done >= 3

    plan = pruned(tiny_gqa)
    with pytest.raises(Cancelled):
        recover(tiny_gqa, conversations(8), RecoveryConfig(method="lora", steps=50), reporter=StopAfterThree())
    assert_no_peft(tiny_gqa.model)
    assert model_shapes(tiny_gqa) == kept_shapes(plan)


RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    path = sys.argv[1]
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True)
    batch = torch.load(path + "/../batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, path + "/../reloaded.pt")
    with safe_open(path + "/model.safetensors", "pt") as f:
        keys = list(f.keys())
    print(json.dumps({"info": {k: sorted(map(str, v)) for k, v in info.items()},
                      "lora_keys": [k for k in keys if "lora" in k],
                      "modules": sorted({type(m).__module__.split('.')[0] for m in model.modules()})}))
    """
)


def test_recovered_model_exports_and_reloads_in_a_fresh_process(tiny_gqa, tmp_path, batch_for):
    from worker.hipp.checkpoint.export import PLAN_FILE, export_pruned

    plan = pruned(tiny_gqa)
    result = recover(tiny_gqa, conversations(16), RecoveryConfig(method="lora", steps=5))
    batch = batch_for(tiny_gqa)
    with torch.no_grad():
        expected = tiny_gqa.model(**batch).logits
    out = tmp_path / "export"
    export_pruned(tiny_gqa.model, tiny_gqa.processor, tiny_gqa.adapter, out, plan=plan,
                  metrics={"recovery": result.record(RecoveryConfig(method="lora", steps=5))})
    torch.save(dict(batch), tmp_path / "batch.pt")
    # -I: isolated mode, so only torch + transformers (no peft, no project code) are used to reload.
    proc = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["info"]["missing_keys"] == [] and report["info"]["unexpected_keys"] == []
    assert report["lora_keys"] == [] and "peft" not in report["modules"]
    assert (torch.load(tmp_path / "reloaded.pt") - expected).abs().max().item() <= 1e-5
    assert PruningPlan.load(out / PLAN_FILE).fingerprint == plan.fingerprint
    assert json.loads((out / "metrics.json").read_text())["recovery"]["steps"] == 5


def test_llava_json_round_trip_and_answer_only_labels(tiny_gqa, tmp_path):
    convs = conversations(2)
    two_turns = Conversation((("What colour is the square?", "red"), ("How many objects are there?", "no")),
                             convs[0].image, "multi")
    path = write_llava_json([*convs, two_turns], tmp_path / "data" / "train.json")
    records = json.loads(path.read_text())
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    loaded = load_llava_json(path)
    assert [c.turns for c in loaded] == [c.turns for c in [*convs, two_turns]]
    # tiny-llava has no chat template: each turn becomes its own example, supervising "answer </s>" only.
    examples = encode_conversation(tiny_gqa, loaded[2])
    tokenizer = tiny_gqa.processor.tokenizer
    assert len(examples) == 2
    for example, (_, answer) in zip(examples, two_turns.turns, strict=True):
        supervised = example.labels[example.labels != IGNORE_INDEX].tolist()
        assert tokenizer.convert_ids_to_tokens(supervised) == [answer, "</s>"]
        assert example.input_ids[-2:].tolist() == supervised


def test_chat_template_conversations_supervise_every_answer(tiny_gqa):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}user : "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% else %}assistant : {% for c in m['content'] %}{{ c['text'] }}{% endfor %} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tiny_gqa.processor.chat_template = template
    conv = Conversation((("what colour is the square ?", "red"), ("how many objects ?", "no")),
                        conversations(1)[0].image, "multi")
    [example] = encode_conversation(tiny_gqa, conv)
    tokenizer = tiny_gqa.processor.tokenizer
    supervised = tokenizer.convert_ids_to_tokens(example.labels[example.labels != IGNORE_INDEX].tolist())
    assert supervised == ["red", "</s>", "no", "</s>"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, "steps must be >= 0"),
        ({"method": "distill"}, "unknown recovery method 'distill'; use one of lora, kd, lora+kd"),
        ({"steps": None}, "give a budget"),
        ({"learning_rate": 5.0}, "learning_rate must be in (0, 1)"),
        ({"lora_rank": 0}, "lora_rank must be >= 1"),
        ({"targets": ("q_proj", "fc1")}, "targets must be a non-empty subset of"),
        ({"kd_weight": 1.0}, "use 'lora+kd'"),
        ({"method": "kd", "kd_weight": 0.0}, "every loss weight is 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_bad_options_fail_clearly(kwargs, message):
    with pytest.raises(OptionError) as info:
        RecoveryConfig(**kwargs)
    assert message in str(info.value)


def test_distillation_needs_a_teacher_with_the_same_vocabulary(tiny_gqa):
    from worker.hipp.models.adapters import get_adapter
    from worker.hipp.models.builtin_llava import BASE_WORDS, TinyLlavaSpec, build_tiny_llava
    from worker.hipp.models.loading import LoadedModel

    pruned(tiny_gqa, 0.3)
    with pytest.raises(OptionError, match="pass a teacher"):
        recover(tiny_gqa, conversations(4), RecoveryConfig(method="kd", steps=1))
    model, processor = build_tiny_llava(TinyLlavaSpec(vocab_words=(*BASE_WORDS, "zebra", "giraffe")))
    other = LoadedModel(model, processor, get_adapter(model), "other-vocab")
    with pytest.raises(OptionError, match="teacher predicts over .* tokens but the student over"):
        recover(tiny_gqa, conversations(4), RecoveryConfig(method="lora+kd", steps=1), teacher=other)


def test_bad_conversation_files_fail_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "hi"},
                                                             {"from": "human", "value": "?"}]}]))
    with pytest.raises(OptionError, match="expected human then gpt"):
        load_llava_json(bad)
    bad.write_text("{not json")
    with pytest.raises(OptionError, match="not valid JSON"):
        load_llava_json(bad)


def test_cli_recover_writes_a_recovered_export(tmp_path, capsys):
    from worker.cli import main

    pruned_dir, out = tmp_path / "pruned", tmp_path / "recovered"
    data = write_llava_json(conversations(8), tmp_path / "data" / "train.json")
    assert main(["prune", "--model", "tiny-llava", "--sparsity", "0.4", "--out", str(pruned_dir), "--quiet"]) == 0
    assert main(["recover", "--model", str(pruned_dir), "--method", "lora+kd", "--steps", "3", "--data", str(data),
                 "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    assert "3 steps" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recovery"]["method"] == "lora+kd" and metrics["recovery"]["teacher"] == "tiny-llava"
    assert "plan" in metrics  # the pruning record is kept
    assert (out / "hipp_plan.json").read_text() == (pruned_dir / "hipp_plan.json").read_text()

    code = main(["recover", "--model", str(pruned_dir), "--method", "prune-harder", "--steps", "3",
                 "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("hipp: error: unknown recovery method 'prune-harder'")
    code = main(["recover", "--model", str(pruned_dir), "--steps", "-2", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "steps must be >= 0" in capsys.readouterr().err
