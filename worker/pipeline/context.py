"""What the stages of one attempt share: the job row, its run, storage and work folder, the request's options
read with the API's defaults (``app/schemas.py``), and what earlier stages made (the loaded model, the plan,
the result so far).

Torch-free, like ``run`` and ``runner``: the engine is imported with the stages (see ``runner``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.models import Artifact, Job
from app.storage import Storage
from worker.hipp.preference import Preference
from worker.pipeline.run import JobRun

if TYPE_CHECKING:
    from worker.hipp.models.loading import LoadedModel
    from worker.hipp.policy.search import SearchSetup
    from worker.hipp.pruning.plan import PruningPlan


@dataclass
class JobContext:
    job: Job
    run: JobRun
    settings: Settings
    storage: Storage
    work_dir: Path
    #: Set by the load stage (or its restore on a retry).
    loaded: LoadedModel = field(init=False)
    #: Set by the plan stage (or its restore on a retry).
    plan: PruningPlan = field(init=False)
    #: A policy training's plan search set-up (its search_setup stage, or that stage's restore on a retry).
    search: SearchSetup = field(init=False)
    #: Every plan considered, in full, in the order of ``result["plans"]`` (set with ``plan``).
    considered_plans: list[PruningPlan] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    new_outputs: dict[str, Any] = field(default_factory=dict)  # recorded when the current stage completes
    rows: list[Artifact] = field(default_factory=list)  # artifact rows, written when the current stage completes

    def option(self, section: str, name: str, default: Any) -> Any:
        """``options[section][name]`` of the request, ``default`` (the API's) when it is not there."""
        return (self.job.options.get(section) or {}).get(name, default)

    @property
    def preference(self) -> Preference:
        return Preference.from_mapping(self.job.preference)

    @property
    def plan_reference(self) -> dict[str, Any] | None:
        """``{job, index, fingerprint}`` of the earlier job's plan to replay (checked by the API), or None."""
        return self.job.options.get("plan")

    @property
    def evaluation_enabled(self) -> bool:
        return bool(self.option("evaluation", "enabled", True))

    @property
    def evaluation_limit(self) -> int:
        """Questions per benchmark split."""
        return int(self.option("evaluation", "max_samples", 16))
