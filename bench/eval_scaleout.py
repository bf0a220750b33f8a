"""Plan evaluations per second with 1 and 2 evaluation worker processes (and in process, for reference) on the
testbed, in one run: how a plan search scales when it outgrows one machine (docs/service.md, "Scaling plan
evaluations").

Each repeat scores ``--plans`` distinct plans of its own (sampled from an untrained policy, all passing the
stability pre-screen, so every one is measured) in each configuration in turn, so no answer comes from a cache
and the machine's changing load falls on all configurations alike. Evaluation workers are real Celery
processes (``worker.evaluation_worker``, one torch thread each) on the local Redis, one queue per
configuration; they are warmed (model and evaluation set loaded, every worker has answered) on other plans
before the clock starts. Writes bench/results/eval_scaleout.{json,md}.

    python -m bench.eval_scaleout     # the committed result: 3 x 48 plans, 24 questions per split, chunks of 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from bench.report import markdown_table, write_report
from worker.cli.serve_processes import evaluation_worker_command
from worker.evaluation_queue import QueueSender, batch_evaluator_for, world_search_spec
from worker.hipp.calibration_source import default_samples
from worker.hipp.evaluation.batch import DelegatedEvaluations, InProcessEvaluations, PlanBatchEvaluator
from worker.hipp.evaluation.plan_evaluator import ScoringMode
from worker.hipp.models.loading import LoadedModel, load_model
from worker.hipp.policy.network import HippPolicy, PolicyConfig
from worker.hipp.policy.search import SearchSetup, environment, prepare_search, testbed_search_set
from worker.hipp.pruning.plan import PruningPlan

MODE = ScoringMode(0.6)


def search_setup(loaded: LoadedModel, folder: Path, limit: int) -> SearchSetup:
    """A fresh evaluator (empty cache) on the world search split, as the workers rebuild it."""
    return prepare_search(loaded, testbed_search_set(folder, limit=limit), default_samples("testbed", 8, 0),
                          s_max=MODE.s_max)


def distinct_plans(setup: SearchSetup, count: int, seed: int = 0) -> list[PruningPlan]:
    """``count`` distinct plans an untrained policy samples at matched sparsities 0.2-0.5, each passing the
    stability pre-screen (a pre-screened plan costs almost nothing and would flatter the rate)."""
    torch.manual_seed(seed)
    policy = HippPolicy(PolicyConfig(num_features=setup.state.features.shape[1], s_max=MODE.s_max))
    env = environment(setup, policy)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    plans: dict[str, PruningPlan] = {}
    while len(plans) < count:
        target = 0.2 + 0.3 * float(torch.rand((), generator=generator))
        plan = env.plan_for(policy.sample(env.features, env.param_share, weights, target, generator), target)
        if plan.fingerprint not in plans and setup.evaluator.stability.evaluate(plan).passes:
            plans[plan.fingerprint] = plan
    return list(plans.values())


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ, HIPP_HOME=str(settings.home), HIPP_BROKER_URL=settings.broker_url,
               HIPP_EVALUATION_QUEUE=settings.evaluation_queue, HIPP_EVALUATION_THREADS="1",
               HIPP_WORK_DIR=str(settings.resolved_work_dir), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@contextlib.contextmanager
def evaluation_workers(settings: Settings, count: int, folder: Path) -> Iterator[list[str]]:
    """``count`` fresh evaluation worker processes; yields their names."""
    names = [f"bench{i + 1}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    procs = []
    for name in names:
        with (folder / f"{name}.log").open("ab") as log:
            procs.append(subprocess.Popen(evaluation_worker_command(settings.evaluation_queue, "-n", f"{name}@%h"),
                                          env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        yield names
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def warm(evaluations: PlanBatchEvaluator, names: list[str], spare: list[PruningPlan], timeout: float = 300) -> int:
    """Send batches of ``spare`` plans (one chunk per worker) until every worker in ``names`` answered one: its
    model and evaluation set are then loaded. Returns how many spare plans it used."""
    assert isinstance(evaluations, DelegatedEvaluations) and isinstance(evaluations.send, QueueSender)
    sender = evaluations.send
    used, deadline = 0, time.monotonic() + timeout
    while not {n.split("@")[0] for n in sender.workers} >= set(names):
        if time.monotonic() > deadline or used + len(names) > len(spare):
            raise SystemExit(f"evaluation workers {names} did not all answer; answered: {sender.workers}")
        batch = spare[used:used + len(names) * sender.settings.evaluation_chunk]
        evaluations.evaluate_many([(p, MODE) for p in batch])
        used += len(batch)
    return used


def timed(evaluations: PlanBatchEvaluator, plans: list[PruningPlan]) -> dict[str, Any]:
    start_evals = evaluations.evaluator.evaluations
    started = time.perf_counter()
    results = evaluations.evaluate_many([(p, MODE) for p in plans])
    wall = time.perf_counter() - started
    assert not any(r.cached or r.prescreened for r in results)
    measured = evaluations.evaluator.evaluations - start_evals
    seconds = sum(r.seconds for r in results)
    return {"plans": len(plans), "measured": measured, "wall_s": round(wall, 3),
            "evaluations_per_s": round(len(plans) / wall, 3),
            "seconds_per_evaluation": round(seconds / len(results), 4)}


CONFIGURATIONS = ("in process", "1 worker", "2 workers")


def queue_evaluations(settings: Settings, setup: SearchSetup, names: list[str], spare: list[PruningPlan],
                      limit: int) -> tuple[DelegatedEvaluations, int]:
    """A caller of ``settings``' evaluation queue, its workers ``names`` warmed; and how many spare plans that
    used."""
    evaluations = batch_evaluator_for(settings, setup, world_search_spec(limit))
    assert isinstance(evaluations, DelegatedEvaluations) and isinstance(evaluations.send, QueueSender)
    used = warm(evaluations, names, spare)
    evaluations.send.workers.clear()
    return evaluations, used


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Each repeat times its own ``--plans`` distinct plans in every configuration, one configuration after the
    other (interleaved, so the machine's changing load affects them alike); the workers of both queue
    configurations stay up (idle ones wait on the broker and use no CPU)."""
    torch.set_num_threads(1)
    loaded = load_model("testbed")
    search_dir = folder / "search"
    probe = search_setup(loaded, search_dir, args.limit)
    plans = distinct_plans(probe, args.plans * args.repeats + args.spare, seed=args.seed)
    spare = plans[args.plans * args.repeats:]
    rounds = [plans[r * args.plans:(r + 1) * args.plans] for r in range(args.repeats)]

    def queue_settings(tag: str) -> Settings:
        return Settings(home=folder / "home", broker_url=args.redis, evaluation_mode="queue",
                        evaluation_queue=f"bench-evaluation-{tag}-{uuid.uuid4().hex[:8]}",
                        evaluation_chunk=args.chunk, evaluation_timeout_s=600, evaluation_threads=1,
                        work_dir=folder / f"work-{tag}")

    one, two = queue_settings("one"), queue_settings("two")
    load_average = [round(x, 2) for x in os.getloadavg()]
    repeats: list[dict[str, Any]] = []
    with evaluation_workers(one, 1, folder) as names_one, evaluation_workers(two, 2, folder) as names_two:
        configured: dict[str, PlanBatchEvaluator] = {
            "in process": InProcessEvaluations(search_setup(loaded, search_dir, args.limit).evaluator)}
        configured["1 worker"], used = queue_evaluations(one, search_setup(loaded, search_dir, args.limit), names_one,
                                                         spare, args.limit)
        configured["2 workers"], _ = queue_evaluations(two, search_setup(loaded, search_dir, args.limit), names_two,
                                                       spare[used:], args.limit)
        for measured in rounds:
            repeat = {}
            for name in CONFIGURATIONS:
                evaluations = configured[name]
                repeat[name] = timed(evaluations, measured)
                if isinstance(evaluations, DelegatedEvaluations) and isinstance(evaluations.send, QueueSender):
                    repeat[name]["answered_by"] = len(evaluations.send.workers)
                    evaluations.send.workers.clear()
            repeats.append(repeat)
    summary = {name: {"evaluations_per_s": round(statistics.median(r[name]["evaluations_per_s"] for r in repeats), 3),
                      "seconds_per_evaluation": round(statistics.median(r[name]["seconds_per_evaluation"]
                                                                        for r in repeats), 4)}
               for name in CONFIGURATIONS}
    ratios = [round(r["2 workers"]["evaluations_per_s"] / r["1 worker"]["evaluations_per_s"], 3) for r in repeats]
    return {"settings": {"plans": args.plans, "repeats": args.repeats, "limit_per_split": args.limit,
                         "questions": probe.evaluator.evalset.size(), "chunk": args.chunk, "seed": args.seed,
                         "torch_threads_per_worker": 1},
            "load_average_at_start": load_average, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "repeats": repeats, "median": summary, "ratios_2_to_1": ratios,
            "ratio_2_to_1": round(summary["2 workers"]["evaluations_per_s"]
                                  / summary["1 worker"]["evaluations_per_s"], 3)}


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    header = ["configuration", *(f"repeat {i + 1} evals/s" for i in range(s["repeats"])), "median evals/s",
              "median s per evaluation (where it ran)"]
    rows = [[name, *(r[name]["evaluations_per_s"] for r in data["repeats"]), data["median"][name]["evaluations_per_s"],
             data["median"][name]["seconds_per_evaluation"]] for name in CONFIGURATIONS]
    ratios = ", ".join(f"{x:.2f}" for x in data["ratios_2_to_1"])
    return (f"Plan evaluations per second on the testbed ({s['questions']} questions: {s['limit_per_split']} per POPE "
            f"split + {s['limit_per_split']} ScienceQA). Each of {s['repeats']} repeats times {s['plans']} distinct "
            f"plans in each configuration in turn (no cache hits, none pre-screened); chunks of {s['chunk']} plans "
            "per task, one torch thread per worker, workers warmed before timing.\n\n"
            + markdown_table(header, rows)
            + f"\n\n**2 workers / 1 worker: {data['ratio_2_to_1']:.2f}x** (ratio of the medians; per repeat: "
            f"{ratios}). " + overhead(data) + contention(data))


def overhead(data: dict[str, Any]) -> str:
    """The queue's own cost: one worker's wall time over the evaluation seconds it measured."""
    shares = [r["1 worker"]["wall_s"] / (r["1 worker"]["plans"] * r["1 worker"]["seconds_per_evaluation"]) - 1
              for r in data["repeats"]]
    return (f"With one worker, the wall time exceeded the worker's own evaluation seconds by "
            f"{100 * statistics.median(shares):.0f}% (median; sending, gathering, the worker's idle gaps). ")


def contention(data: dict[str, Any]) -> str:
    """What the per-evaluation times say about this machine (written from the numbers, not assumed)."""
    median, cores = data["median"], os.cpu_count()
    one, two = median["1 worker"]["seconds_per_evaluation"], median["2 workers"]["seconds_per_evaluation"]
    local = median["in process"]["seconds_per_evaluation"]
    return (f"This machine has {cores} cores and was shared with other work (load average "
            f"{data['load_average_at_start']} at the start, {data['load_average_at_end']} at the end). One "
            f"evaluation took {local:.3f} s in process, {one:.3f} s on one worker and {two:.3f} s on each of two "
            "(medians): "
            + ("with two workers each evaluation was slower, so the workers competed for cores (with each other, "
               "the caller and the machine's other load) and the ratio is a floor for workers on separate machines, "
               "where each keeps its one-worker speed." if two > one * 1.1 else
               "the two workers ran at about one worker's speed each; what is left of the ideal 2x is the queue's "
               "overhead and the other load on the cores.")
            + " The spread across repeats is the shared machine's; reproduce on a quiet machine (or one worker "
            "per machine) for the scaling a deployment sees.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=48, help="distinct plans timed per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fresh plans, configurations interleaved")
    parser.add_argument("--spare", type=int, default=24, help="other plans, for warming the workers")
    parser.add_argument("--limit", type=int, default=24, help="questions per POPE split and ScienceQA")
    parser.add_argument("--chunk", type=int, default=2, help="plans per evaluation task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis", default=os.environ.get("HIPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hipp-eval-scaleout-") as tmp:
        data = run(args, Path(tmp))
    write_report("eval_scaleout", data, markdown(data), out_dir=args.out)


if __name__ == "__main__":
    main()
