"""Batched plan evaluation (worker/hipp/evaluation/batch.py): GRPO and the plan search score each step's plans as
one batch without changing what they compute, and a delegated batch evaluator answers cache hits locally and
sends each missing plan once. The evaluation queue's workers are tested in tests/service/test_evaluation_queue.py."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from worker.hipp.calibration_source import default_samples
from worker.hipp.evaluation.batch import DelegatedEvaluations, PlanRequest
from worker.hipp.evaluation.plan_evaluator import PlanEvaluation, PlanEvaluator, ScoringMode
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.policy import search
from worker.hipp.policy.grpo import GRPOConfig
from worker.hipp.policy.network import HippPolicy, PolicyConfig
from worker.hipp.policy.search import SearchSetup, prepare_search, sample_plans, train_policy
from worker.hipp.progress import SILENT, Reporter

#: The GRPO run both files train: 2 steps x 2 preferences x 3 plans on the testbed's search split.
RECIPE = GRPOConfig(steps=2, preferences_per_step=2, group_size=3, seed=1)
SEARCH_LIMIT = 24
#: sha256 of the policy trained with RECIPE (weights rounded to 6 decimals, 1 torch thread), computed with the
#: engine before steps were batched (commit 8a0f396: each group sampled and evaluated before the next). The
#: batched step samples in the same order and must train exactly the same policy.
SEQUENTIAL_WEIGHTS = "b419874eb49415fe430c6ecd98f7a9e691c51f7086aab0ade16675b5845b429a"


def search_setup(folder: Path, loaded: LoadedModel | None = None) -> SearchSetup:
    """The testbed (``loaded``, else loaded now) set up for search on its world search split (``SEARCH_LIMIT``
    questions per split), as an evaluation worker rebuilds it from ``world_search_spec(SEARCH_LIMIT)``; a fresh
    evaluator each time (an empty cache)."""
    loaded = loaded or load_model("testbed")
    evalset = search.testbed_search_set(folder, limit=SEARCH_LIMIT)
    return prepare_search(loaded, evalset, default_samples("testbed", 4, 0), s_max=0.6)


def weights_digest(policy: HippPolicy) -> str:
    digest = hashlib.sha256()
    state = policy.state_dict()
    for name in sorted(state):
        digest.update(state[name].detach().float().numpy().round(6).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> SearchSetup:
    torch.set_num_threads(1)
    return search_setup(tmp_path_factory.mktemp("search"))


def test_batched_grpo_trains_the_same_policy_as_the_sequential_loop(setup: SearchSetup, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    before = setup.evaluator.evaluations
    # The digest was taken with the budget head of that time (logistic); the batching does not depend on the head.
    config = PolicyConfig(num_features=setup.state.features.shape[1], s_max=setup.evaluator.mode.s_max,
                          budget_head="logistic")
    stored = train_policy(setup, tmp_path / "policy", config, grpo_config=RECIPE, resume=False)
    assert weights_digest(stored.policy) == SEQUENTIAL_WEIGHTS
    # Every plan of the 12 was measured or pre-screened here; the counters still count measured plans only.
    assert stored.meta["training"]["plan_evaluations"] == setup.evaluator.evaluations - before > 0
    assert stored.meta["training"]["seconds_per_evaluation"] > 0


class Recording:
    """A ``send`` that scores plans with another evaluator (as a worker would) and records what it was sent."""

    def __init__(self, remote: PlanEvaluator) -> None:
        self.remote = remote
        self.sent: list[list[str]] = []

    def __call__(self, requests: Sequence[PlanRequest], reporter: Reporter = SILENT) -> list[PlanEvaluation]:
        self.sent.append([plan.fingerprint for plan, _ in requests])
        return [self.remote.evaluate(plan, mode=mode) for plan, mode in requests]


def test_delegated_evaluations_send_each_missing_plan_once_and_keep_hits_local(setup: SearchSetup,
                                                                               tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stored = train_policy(setup, tmp_path / "policy", grpo_config=GRPOConfig(steps=0), resume=False)
    local = prepare_search(setup.loaded, setup.evaluator.evalset, default_samples("testbed", 4, 0), s_max=0.6)
    send = Recording(setup.evaluator)
    delegated = DelegatedEvaluations(local.evaluator, send)
    reference = sample_plans(setup, stored, [0.2, 0.5, 0.3], samples=4, target=0.3, seed=5)
    plans = [c.plan for c in reference]
    mode = ScoringMode(0.6, 0.3)

    # The same plan twice in one batch is sent once; the repeat is a local cache hit, as in the sequential loop.
    first = delegated.evaluate_many([(plans[1], mode), (plans[1], mode), (plans[2], mode)])
    assert send.sent == [[plans[1].fingerprint, plans[2].fingerprint]]
    assert [e.cached for e in first] == [False, True, False]
    assert local.evaluator.evaluations == sum(not e.prescreened for e in (first[0], first[2]))

    # Plans answered before never go out again; the answers equal the in-process ones (objectives in each
    # request's mode, also for hits).
    again = delegated.evaluate_many([(p, mode) for p in plans])
    # (an untrained policy's two allocation heads can give the same plan: it goes out once)
    assert send.sent[1] == list(dict.fromkeys(p.fingerprint for p in plans if p.fingerprint not in send.sent[0]))
    for answer, candidate in zip(again, reference, strict=True):
        assert answer.objectives == candidate.evaluation.objectives
        assert answer.metrics == candidate.evaluation.metrics
    free = delegated.evaluate_many([(plans[1], ScoringMode(0.8))])[0]
    assert free.cached and free.objectives.compression == pytest.approx(plans[1].sparsity / 0.8)
    assert len(send.sent) == 2

    # The job's search through the delegated evaluator chooses from the same candidates.
    through = sample_plans(local, stored, [0.2, 0.5, 0.3], samples=4, target=0.3, seed=5, evaluations=delegated)
    assert [(c.plan.fingerprint, c.value) for c in through] == [(c.plan.fingerprint, c.value) for c in reference]
