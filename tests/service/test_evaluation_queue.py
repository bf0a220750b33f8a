"""Plan evaluations on evaluation workers (worker/evaluation_queue.py): real Celery worker processes on the local
Redis score a GRPO run's plans, and the policy trained with one or two of them equals the one trained in
process (same seed). Also what a caller is told when a worker refuses its model or no worker answers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from app.config import Settings
from app.queue import make_celery_client
from tests.faults.conftest import FINAL, Proc, wait_for
from tests.service.conftest import app_client, auth, stack_env
from tests.test_evaluation_batch import RECIPE, SEARCH_LIMIT, search_setup, weights_digest
from worker.cli.serve_processes import celery_worker_command, evaluation_worker_command
from worker.evaluation_queue import (
    POLL_S,
    EvaluationQueueError,
    QueueSender,
    batch_evaluator_for,
    evaluator_description,
    world_search_spec,
)
from worker.hipp.evaluation.batch import DelegatedEvaluations
from worker.hipp.evaluation.plan_evaluator import ScoringMode
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.policy.search import SearchSetup, train_policy
from worker.hipp.progress import Cancelled, Reporter


@pytest.fixture(scope="module")
def queue_settings(redis_url: str, session_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Redis broker and result backend; an evaluation queue of this session's own. No database: evaluation
    workers use none."""
    home = tmp_path_factory.mktemp("hipp-eval")
    return Settings(home=home, broker_url=redis_url, evaluation_mode="queue",
                    evaluation_queue=f"evaluation-{session_tag}", gpu_queue=f"gpu-{session_tag}",
                    default_queue=f"default-{session_tag}", evaluation_chunk=1, evaluation_timeout_s=120,
                    evaluation_threads=1)


def start_worker(settings: Settings, name: str, folder: Path) -> Proc:
    """One evaluation worker process named ``name`` (its own work folder: a machine of its own)."""
    env = stack_env(settings.model_copy(update={"work_dir": folder / name}))
    env["OMP_NUM_THREADS"] = "1"
    return Proc(evaluation_worker_command(settings.evaluation_queue, "-n", f"{name}@%h"), env,
                folder / f"{name}.log").start()


def wait_until_consuming(settings: Settings, workers: list[Proc], names: list[str], timeout: float = 60) -> None:
    """Until every worker in ``names`` answers a ping (it is then consuming its queue)."""
    client = make_celery_client(settings)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for proc in workers:
                assert proc.alive(), proc.tail()
            answered = {name.split("@")[0] for reply in client.control.ping(timeout=1.0) for name in reply}
            if set(names) <= answered:
                return
        raise AssertionError(f"evaluation workers {names} did not answer a ping in {timeout}s; "
                             f"{[p.tail(800) for p in workers]}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def testbed() -> LoadedModel:
    return load_model("testbed")


@pytest.fixture(scope="module")
def idle_setup(testbed: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> SearchSetup:
    """A setup for the tests that train nothing (its evaluator scores no plan there)."""
    return search_setup(tmp_path_factory.mktemp("search"), testbed)


@pytest.fixture(scope="module")
def workers(queue_settings: Settings) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def trained(setup: SearchSetup, out: Path, settings: Settings | None) -> tuple[str, set[str]]:
    """The digest of the policy trained with RECIPE (through the queue when ``settings``) and who evaluated."""
    evaluations = batch_evaluator_for(settings, setup, world_search_spec(SEARCH_LIMIT)) if settings else None
    stored = train_policy(setup, out, grpo_config=RECIPE, resume=False, evaluations=evaluations)
    sender = evaluations.send if isinstance(evaluations, DelegatedEvaluations) else None
    return weights_digest(stored.policy), (sender.workers if isinstance(sender, QueueSender) else set())


def test_policy_trained_with_two_evaluation_workers_equals_one_and_in_process(
        queue_settings: Settings, workers: list[Proc], testbed: LoadedModel, tmp_path: Path) -> None:
    torch.set_num_threads(1)  # as the evaluation workers: equal thread counts give equal float reductions
    workers.append(start_worker(queue_settings, "eval1", tmp_path))
    in_process, nobody = trained(search_setup(tmp_path / "search", testbed), tmp_path / "p0", None)
    assert not nobody

    wait_until_consuming(queue_settings, workers, ["eval1"])
    setup = search_setup(tmp_path / "search", testbed)  # a fresh evaluator: its cache must not answer
    one_worker, answered = trained(setup, tmp_path / "p1", queue_settings)
    assert answered == {next(iter(answered))} and next(iter(answered)).startswith("eval1@")
    assert setup.evaluator.evaluations > 0  # answers are recorded (and counted) where the training runs

    workers.append(start_worker(queue_settings, "eval2", tmp_path))
    wait_until_consuming(queue_settings, workers, ["eval1", "eval2"])
    two_workers, answered = trained(search_setup(tmp_path / "search", testbed), tmp_path / "p2", queue_settings)
    assert {name.split("@")[0] for name in answered} == {"eval1", "eval2"}

    assert one_worker == in_process
    assert two_workers == in_process
    # eval1 answered both runs from one pool child that loaded the model and the search set once.
    log = workers[0].tail(1_000_000)
    assert log.count("evaluator for testbed") == 1, log[-3000:]
    assert set(re.findall(r"ForkPoolWorker-\d+", log)) == {"ForkPoolWorker-1"}


def test_a_worker_refuses_another_model_and_the_caller_says_why(
        queue_settings: Settings, workers: list[Proc], idle_setup: SearchSetup, tmp_path: Path) -> None:
    if not workers:
        workers.append(start_worker(queue_settings, "eval1", tmp_path))
    wait_until_consuming(queue_settings, workers, ["eval1"])
    setup = idle_setup
    description = evaluator_description(setup, world_search_spec(SEARCH_LIMIT))
    description["model"] = {**description["model"], "fingerprint": "0" * 16}  # the job's copy differs
    delegated = DelegatedEvaluations(setup.evaluator, QueueSender(queue_settings, description))
    plan = _one_plan(setup)
    with pytest.raises(EvaluationQueueError, match="the job.s has 0{16}: the workers must see the same model"):
        delegated.evaluate_many([(plan, ScoringMode(0.6))])
    assert setup.evaluator.evaluations == 0


def test_no_evaluation_worker_is_a_bounded_wait_with_a_clear_error(queue_settings: Settings,
                                                                   idle_setup: SearchSetup) -> None:
    settings = queue_settings.model_copy(update={"evaluation_queue": f"{queue_settings.evaluation_queue}-nobody",
                                                 "evaluation_timeout_s": 2.0})
    setup = idle_setup
    delegated = batch_evaluator_for(settings, setup, world_search_spec(SEARCH_LIMIT))
    plan = _one_plan(setup)
    started = time.monotonic()
    with pytest.raises(EvaluationQueueError, match="timed out after 2s: 0 of 1 chunks answered"):
        delegated.evaluate_many([(plan, ScoringMode(0.6))])
    assert time.monotonic() - started < 10

    # A job cancelled while it waits stops waiting at the next check (every POLL_S), long before the timeout.
    patient = batch_evaluator_for(settings.model_copy(update={"evaluation_timeout_s": 600}), setup,
                                  world_search_spec(SEARCH_LIMIT))
    started = time.monotonic()
    with pytest.raises(Cancelled):
        patient.evaluate_many([(plan, ScoringMode(0.6))], CancelAfter(checks=3))
    assert time.monotonic() - started < 3 * POLL_S + 5


class CancelAfter(Reporter):
    """A reporter whose caller cancels after ``checks`` checks."""

    def __init__(self, checks: int) -> None:
        self.left = checks

    def should_stop(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_jobs_plan_search_runs_on_the_evaluation_workers(
        queue_settings: Settings, stack_settings: Settings, workers: list[Proc], tenant_key: str,
        tmp_path: Path) -> None:
    """A job on the testbed (its shipped policy plans it) in a real GPU worker: the job's Celery task sends its
    plan search to the evaluation queue and waits on it."""
    if not workers:
        workers.append(start_worker(queue_settings, "eval1", tmp_path))
    settings = stack_settings.model_copy(update={
        "gpu_queue": f"{stack_settings.gpu_queue}-eq", "evaluation_mode": "queue", "evaluation_chunk": 3,
        "evaluation_queue": queue_settings.evaluation_queue, "evaluation_timeout_s": 120})
    gpu = Proc(celery_worker_command(settings.gpu_queue), stack_env(settings), tmp_path / "gpu.log").start()
    try:
        wait_until_consuming(queue_settings, workers, ["eval1"])
        with app_client(settings) as api:
            body = {"model": "testbed", "preference": {"utility": 0.5, "robustness": 0.3, "compression": 0.2},
                    "evaluation": {"enabled": False, "max_samples": 4}}
            r = api.post("/jobs", json=body, headers=auth(tenant_key))
            assert r.status_code == 201, r.text
            job = wait_for(lambda: api.get(f"/jobs/{r.json()['id']}", headers=auth(tenant_key)).json(),
                           lambda j: j["status"] in FINAL, 240, "the job")
    finally:
        gpu.stop()
    assert job["status"] == "succeeded", (job["error"], gpu.tail())
    assert job["result"]["plan_source"] == "policy"
    logs = "".join(p.tail(200_000) for p in workers)
    assert re.search(r"Task hipp\.evaluate_plans\[[^]]+\] succeeded", logs), "no chunk of the search was answered"


def test_filesystem_broker_has_no_queue_mode(tmp_path: Path) -> None:
    """The embedded deployment's broker keeps no results: its settings refuse queue mode at start-up."""
    with pytest.raises(ValidationError, match="HIPP_EVALUATION_MODE=inprocess"):
        Settings(home=tmp_path, evaluation_mode="queue")
    assert Settings(home=tmp_path).resolved_result_backend is None


def _one_plan(setup: SearchSetup):  # type: ignore[no-untyped-def]
    from worker.hipp.pruning.planner import build_plan

    return build_plan(setup.loaded, 0.3, criterion="wanda-sp", allocation="uniform", scoring=setup.scoring)
