"""Validating a data set (the ``hipp.validate_dataset`` task, on the light queue): download its archive from the
store, unpack it safely (worker/archives.py), check it by kind with the engine's own loaders, and record the
outcome on the row: ``ready`` with counts, SHA-256 and size, or ``invalid`` with reasons.

- ``images``: every image file decoded; at least one.
- ``pope``: the official ``*pope_{random,popular,adversarial}.json`` files (one JSON object per line:
  question_id, image, text, label) and their image folder, read line by line (a bad line is named by file and
  line) and then through ``evaluation.tasks.pope.load_pope``; every referenced image decoded.
- ``scienceqa``: ``problems.json`` + ``pid_splits.json`` + ``images/{split}/{pid}/...``, each problem checked
  (named by its id) and every split read through ``evaluation.tasks.scienceqa.load_scienceqa``.
- ``conversations``: LLaVA-format JSON files read through ``recovery.conversations.load_llava_json``.

Images are opened header-first: one over ``HIPP_DATASET_MAX_IMAGE_PIXELS`` is refused before its pixels are
decoded. Reasons name files relative to the archive's root. Nothing is written to the store: the unpacked files
live in the worker's scratch folder and are removed when validation ends. The engine loaders (they import torch)
are imported when a kind needs them.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Dataset, DatasetState, utcnow
from app.storage import Storage, StorageError, sha256_file
from worker.archives import ArchiveRefused, Limits, unpack

log = logging.getLogger("hipp.datasets")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_FIELDS = ("question_id", "image", "text", "label")
MAX_REASONS = 50


@dataclass
class Report:
    """What validation found: counts, and the reasons the data set is invalid (empty: valid)."""

    root: Path
    counts: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def refuse(self, reason: str) -> None:
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason.replace(f"{self.root}/", "").replace(str(self.root), "."))

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


# ------------------------------------------------------------------------------------------------- images


def check_image(path: Path, max_pixels: int, report: Report, where: str = "") -> bool:
    """Decode one image, refusing it from its header when it has more than ``max_pixels`` pixels."""
    label = f"{where}: image {report.rel(path)}" if where else report.rel(path)
    if report.root not in path.resolve().parents:  # a reference such as "../../etc/x" in a question file
        report.refuse(f"{label}: the image path leaves the archive; use paths inside it")
        return False
    if not path.is_file():
        report.refuse(f"{label}: not found in the archive")
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    report.refuse(f"{label}: {width}x{height} pixels, more than the {max_pixels} allowed "
                                  "(HIPP_DATASET_MAX_IMAGE_PIXELS)")
                    return False
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        report.refuse(f"{label}: too many pixels ({exc})")
        return False
    except (OSError, SyntaxError, ValueError) as exc:
        report.refuse(f"{label}: cannot be decoded as an image ({exc})")
        return False
    return True


def check_images(paths: Iterable[Path], max_pixels: int, report: Report) -> int:
    return sum(check_image(p, max_pixels, report) for p in sorted(set(paths)))


def validate_images(report: Report, settings: Settings) -> None:
    images = [p for p in report.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        report.refuse(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the archive")
        return
    report.counts = {"images": check_images(images, settings.dataset_max_image_pixels, report)}


# --------------------------------------------------------------------------------------------------- POPE


def pope_files(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in POPE_SPLITS:
        matches = sorted(root.rglob(f"*pope_{split}.json"), key=lambda p: (len(p.parts), str(p)))
        if matches:
            found[split] = matches[0]
    return found


def check_pope_line(line: str, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """One line of a POPE question file: (the record, None) or (None, why it is wrong)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"{where}: expected a JSON object with {', '.join(POPE_FIELDS)}"
    missing = [k for k in POPE_FIELDS if k not in row]
    if missing:
        return None, f"{where}: missing {', '.join(repr(k) for k in missing)}"
    if str(row["label"]).strip().lower() not in ("yes", "no"):
        return None, f"{where}: label must be yes or no, got {str(row['label'])[:40]!r}"
    try:
        int(str(row["question_id"]))
    except ValueError:
        return None, f"{where}: question_id must be an integer, got {str(row['question_id'])[:40]!r}"
    return row, None


def validate_pope(report: Report, settings: Settings) -> None:
    from worker.hipp.errors import HippError
    from worker.hipp.evaluation.tasks.pope import load_pope

    files = pope_files(report.root)
    if not files:
        report.refuse("no POPE question files: expected coco_pope_random.json, coco_pope_popular.json and/or "
                      "coco_pope_adversarial.json (one JSON object per line)")
        return
    folder = files[next(iter(files))].parent
    for path in files.values():
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                _, why = check_pope_line(line, f"{report.rel(path)} line {number}")
                if why is not None:
                    report.refuse(why)
    if report.reasons:
        return
    try:
        loaded = load_pope(folder, splits=tuple(files))
    except (HippError, ValueError, KeyError) as exc:
        report.refuse(f"POPE: {exc}")
        return
    images = [Path(q.image) for questions in loaded.values() for q in questions]  # resolved by the loader
    decoded = check_images(images, settings.dataset_max_image_pixels, report)
    report.counts = {"questions": {split: len(qs) for split, qs in loaded.items()}, "images": decoded}


# ---------------------------------------------------------------------------------------------- ScienceQA


def read_json(path: Path, report: Report) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        report.refuse(f"{report.rel(path)} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
    except (OSError, UnicodeDecodeError) as exc:
        report.refuse(f"{report.rel(path)}: cannot be read as UTF-8 text ({exc})")
    return None


def check_problem(pid: str, problem: Any) -> str | None:
    where = f"problems.json problem {pid!r}"
    if not isinstance(problem, dict):
        return f"{where}: expected an object"
    for key in ("question", "choices", "answer"):
        if key not in problem:
            return f"{where}: missing {key!r}"
    choices = problem["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        return f"{where}: choices must be a list of at least 2 options"
    answer = problem["answer"]
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"{where}: answer must be an index into choices (0 to {len(choices) - 1}), got {answer!r}"
    return None


def validate_scienceqa(report: Report, settings: Settings) -> None:
    from worker.hipp.errors import HippError
    from worker.hipp.evaluation.tasks.scienceqa import load_scienceqa

    found = sorted(report.root.rglob("problems.json"), key=lambda p: len(p.parts))
    if not found:
        report.refuse("no problems.json: ScienceQA needs problems.json, pid_splits.json and images/")
        return
    folder = found[0].parent
    if not (folder / "pid_splits.json").is_file():
        report.refuse(f"no pid_splits.json next to {report.rel(found[0])}")
        return
    problems, splits = read_json(folder / "problems.json", report), read_json(folder / "pid_splits.json", report)
    if report.reasons:
        return
    if not isinstance(problems, dict):
        report.refuse("problems.json: expected an object mapping problem ids to problems")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        report.refuse("pid_splits.json: expected an object mapping split names to lists of problem ids")
    if report.reasons:
        return
    for split, pids in splits.items():
        for pid in pids:
            if str(pid) not in problems:
                report.refuse(f"pid_splits.json split {split!r}: problem {str(pid)!r} is not in problems.json")
            elif (why := check_problem(str(pid), problems[str(pid)])) is not None:
                report.refuse(why)
    if report.reasons:
        return
    counts: dict[str, int] = {}
    images: list[Path] = []
    for split in splits:
        try:
            loaded = load_scienceqa(folder, split)
        except (HippError, ValueError, KeyError, TypeError) as exc:
            report.refuse(f"ScienceQA split {split!r}: {exc}")
            continue
        counts[split] = len(loaded)
        images += [Path(p.image) for p in loaded if p.image]
    decoded = check_images(images, settings.dataset_max_image_pixels, report)
    report.counts = {"problems": counts, "images": decoded}


# ---------------------------------------------------------------------------------------------- conversations


def validate_conversations(report: Report, settings: Settings) -> None:
    from worker.hipp.errors import HippError
    from worker.hipp.recovery.conversations import load_llava_json

    files = sorted(report.root.rglob("*.json"), key=lambda p: (len(p.parts), str(p)))
    files = [p for p in files if len(p.parts) == len(files[0].parts)] if files else []
    if not files:
        report.refuse("no LLaVA-format JSON file (a list of {id, image, conversations}) in the archive")
        return
    conversations, turns, images = 0, 0, []
    for path in files:
        if read_json(path, report) is None:
            continue
        try:
            loaded = load_llava_json(path)
        except HippError as exc:
            report.refuse(str(exc))
            continue
        conversations += len(loaded)
        turns += sum(len(c.turns) for c in loaded)
        images += [c.image for c in loaded if isinstance(c.image, Path)]
    if report.reasons:
        return
    decoded = check_images(images, settings.dataset_max_image_pixels, report)
    report.counts = {"conversations": conversations, "turns": turns, "images": decoded}


VALIDATORS: dict[str, Callable[[Report, Settings], None]] = {
    "images": validate_images,
    "pope": validate_pope,
    "scienceqa": validate_scienceqa,
    "conversations": validate_conversations,
}


# ------------------------------------------------------------------------------------------------ the task


def limits(settings: Settings) -> Limits:
    return Limits(settings.dataset_max_members, settings.dataset_max_unpacked_bytes, settings.dataset_max_ratio)


def inspect_archive(archive: Path, kind: str, scratch: Path, settings: Settings) -> Report:
    """Unpack ``archive`` under ``scratch`` and validate it as ``kind``."""
    files = scratch / "files"
    report = Report(files.resolve())
    try:
        unpack(archive, files, limits(settings))
    except ArchiveRefused as exc:
        for reason in exc.reasons:
            report.refuse(f"archive: {reason}")
        return report
    VALIDATORS[kind](report, settings)
    return report


def validate_dataset(
    dataset_id: str, settings: Settings, factory: sessionmaker[Session], storage: Storage
) -> str:
    """Validate one ``validating`` data set and record the outcome; returns its new state (or the state it
    was found in, when there was nothing to do: deleted, or validated by an earlier delivery)."""
    ident = uuid.UUID(dataset_id)
    with factory() as session:
        dataset = session.get(Dataset, ident)
        if dataset is None or dataset.state != DatasetState.validating.value:
            return "missing" if dataset is None else dataset.state
        kind, key = dataset.kind, dataset.key
    scratch = settings.resolved_work_dir / "datasets" / dataset_id
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        sha256, size, report = _download_and_inspect(storage, key, kind, scratch, settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    state = DatasetState.invalid if report.reasons else DatasetState.ready
    with factory() as session:
        session.execute(
            update(Dataset)
            .where(Dataset.id == ident, Dataset.state == DatasetState.validating.value)
            .values(state=state.value, counts=report.counts if not report.reasons else {}, reasons=report.reasons,
                    sha256=sha256, size=size, updated_at=utcnow())
        )
        session.commit()
    log.info("dataset %s (%s): %s %s", dataset_id, kind, state.value, report.reasons[:3])
    return state.value


def _download_and_inspect(
    storage: Storage, key: str, kind: str, scratch: Path, settings: Settings
) -> tuple[str | None, int | None, Report]:
    archive = scratch / "archive"
    try:
        storage.download(key, archive)
    except (StorageError, OSError, ValueError) as exc:
        report = Report(scratch)
        report.refuse(f"the archive could not be read from the store ({exc}); upload it again")
        return None, None, report
    except Exception as exc:  # botocore's errors: a missing or forbidden s3:// object
        report = Report(scratch)
        report.refuse(f"the archive could not be read from the store ({str(exc)[:300]}); check the s3:// URI")
        return None, None, report
    size, sha256 = archive.stat().st_size, sha256_file(archive)
    if size > settings.dataset_upload_max_bytes:
        report = Report(scratch)
        report.refuse(f"the archive holds {size} bytes, more than the {settings.dataset_upload_max_bytes} allowed")
        return sha256, size, report
    return sha256, size, inspect_archive(archive, kind, scratch, settings)
