"""The tenant's data sets a job names (``options["data"]``, checked by the API: app/services/job_data.py),
fetched for the stages: each archive is downloaded from the store once per job, its SHA-256 checked against
the one validation recorded (a mismatch fails the job: the data set changed after it was validated), and
unpacked safely (worker/archives.py) under the job's work folder, where later stages and a retry of this
attempt find it again.

Also what each use of data is labelled with in the result: every metrics dict names the data it was measured
on, a data set's ``{id, sha256}`` or the synthetic world."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.storage import Storage, sha256_file
from worker.archives import ArchiveRefused, unpack
from worker.datasets import IMAGE_SUFFIXES, limits, pope_files
from worker.hipp.errors import HippError
from worker.hipp.models.builtin import is_testbed
from worker.hipp.testbed.data import DEFAULT_SEED
from worker.pipeline.context import JobContext

#: How the synthetic world's test benchmarks are named in a result.
WORLD_LABEL = f"synthetic world (seed {DEFAULT_SEED})"
UNPACKED = ".unpacked"  # written last: a folder without it is a partial unpack, redone


class DataError(HippError):
    """A named data set cannot be used as it is (changed since it was validated, or no longer unpackable)."""

    code = "invalid_data"


@dataclass(frozen=True)
class Benchmarks:
    """POPE and/or ScienceQA folders of the tenant's data sets, and what they are labelled with."""

    pope_dir: Path | None
    sqa_dir: Path | None
    sqa_split: str
    label: dict[str, Any]


def named(ctx: JobContext, place: str) -> dict[str, Any] | None:
    """``options["data"][place]``: a reference ``{id, sha256, key, ...}`` or a ``{pope, scienceqa}`` pair."""
    value = (ctx.job.options.get("data") or {}).get(place)
    return value or None


def label_of(ref: dict[str, Any]) -> dict[str, str]:
    return {"id": str(ref["id"]), "sha256": str(ref["sha256"])}


def dataset_dir(ctx: JobContext, ref: dict[str, Any]) -> Path:
    """The unpacked files of the data set ``ref`` (downloaded and checked on first use in this job)."""
    return fetch_dataset(ctx.storage, ctx.settings, ref, ctx.work_dir / "data" / str(ref["id"]), ctx.run.event)


def fetch_dataset(storage: Storage, settings: Settings, ref: dict[str, Any], folder: Path,
                  note: Callable[[str], object] = lambda _: None) -> Path:
    """The unpacked files of the data set ``ref`` under ``folder``: downloaded (``note`` says so), its SHA-256
    checked and unpacked the first time, found there after (also by an evaluation worker, which fetches the
    job's search data itself)."""
    files = folder / "files"
    if (folder / UNPACKED).is_file():
        return files
    shutil.rmtree(folder, ignore_errors=True)
    archive = folder / "archive"
    note(f"fetching {ref['kind']} data set {ref['id']} ({ref.get('name', '')})")
    storage.download(str(ref["key"]), archive)
    digest = sha256_file(archive)
    if digest != ref["sha256"]:
        raise DataError(f"data set {ref['id']}: its archive's SHA-256 is {digest}, not {ref['sha256']} as when it "
                        "was validated (it was changed since); upload it again as a new data set and submit the "
                        "job with the new id")
    try:
        unpack(archive, files, limits(settings))
    except ArchiveRefused as exc:
        raise DataError(f"data set {ref['id']} cannot be unpacked: {'; '.join(exc.reasons[:3])}") from exc
    archive.unlink()
    (folder / UNPACKED).touch()
    return files


# --- each kind's files, found as validation found them (worker/datasets.py) ----------------------------------
def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pope_folder(root: Path) -> Path:
    files = pope_files(root)
    if not files:
        raise DataError("the POPE data set holds no coco_pope_{random,popular,adversarial}.json")
    return files[next(iter(files))].parent


def scienceqa_folder(root: Path) -> Path:
    found = sorted(root.rglob("problems.json"), key=lambda p: len(p.parts))
    if not found:
        raise DataError("the ScienceQA data set holds no problems.json")
    return found[0].parent


def scienceqa_split(folder: Path, preferred: str) -> str:
    """``preferred`` when it has problems with an image, else the split with the most of them."""
    problems = json.loads((folder / "problems.json").read_text(encoding="utf-8"))
    splits = json.loads((folder / "pid_splits.json").read_text(encoding="utf-8"))
    with_image = {split: sum(1 for pid in pids if (problems.get(str(pid)) or {}).get("image"))
                  for split, pids in splits.items()}
    if with_image.get(preferred):
        return preferred
    best = max(with_image, key=lambda s: with_image[s], default=preferred)
    if not with_image.get(best):
        raise DataError("the ScienceQA data set has no problem with an image in any split (ScienceQA-IMG needs one)")
    return best


def conversation_files(root: Path) -> list[Path]:
    """The LLaVA-format JSON files at the shallowest level that has any (as validation reads them)."""
    files = sorted(root.rglob("*.json"), key=lambda p: (len(p.parts), str(p)))
    return [p for p in files if len(p.parts) == len(files[0].parts)] if files else []


# --- what each stage uses ----------------------------------------------------------------------------------------
def benchmarks(ctx: JobContext, place: str, sqa_split: str) -> Benchmarks | None:
    """The tenant's POPE / ScienceQA files named at ``data.<place>`` (evaluation or search), None if none."""
    pair = named(ctx, place)
    if not pair:
        return None
    pope = pope_folder(dataset_dir(ctx, pair["pope"])) if pair.get("pope") else None
    sqa = scienceqa_folder(dataset_dir(ctx, pair["scienceqa"])) if pair.get("scienceqa") else None
    split = scienceqa_split(sqa, sqa_split) if sqa is not None else sqa_split
    label = {kind: label_of(ref) for kind, ref in pair.items() if ref}
    return Benchmarks(pope, sqa, split, label)


def world_evaluation_allowed(ctx: JobContext) -> bool:
    """The synthetic world is the testbed's own data; any other model is evaluated on it only when asked."""
    return is_testbed(ctx.job.model) or bool(ctx.option("evaluation", "world", False))


def no_evaluation_data_reason(ctx: JobContext) -> str:
    return (f"no evaluation data: {ctx.job.model!r} is not the testbed and the job names no data.evaluation "
            "(pope / scienceqa data sets), so nothing was evaluated; name your benchmark data sets, or set "
            "evaluation.world to evaluate on the synthetic world")
