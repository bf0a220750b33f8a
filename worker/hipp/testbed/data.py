"""Writes the testbed's benchmark files (POPE- and ScienceQA-format) from held-out world images, and makes
calibration samples from the same world.

The image streams here (prefixes ``pope_test`` and ``sqa_*``) never overlap the training split (``train``)
or the training-time validation images (``trainval``).
"""

from __future__ import annotations

import random
from pathlib import Path

from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.data.world import CATEGORY_NAMES, generate_scenes, render
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.pope import ObjectStats
from worker.hipp.progress import SILENT, Reporter

DEFAULT_SEED = 1234
POPE_IMAGES = 500  # x 6 questions = 3,000 per split, as in the real POPE
SQA_SIZES = {"train": 1000, "val": 500, "test": 1200}


def write_benchmarks(
    out: Path,
    seed: int = DEFAULT_SEED,
    pope_images: int = POPE_IMAGES,
    sqa_sizes: dict[str, int] | None = None,
    report: Reporter = SILENT,
) -> dict[str, dict[str, int]]:
    """Write ``out/pope`` and ``out/scienceqa``; returns the number of questions per split."""
    sizes = sqa_sizes or SQA_SIZES
    report.stage("pope", f"{pope_images} images")
    # POPE uses images with at least 3 objects so each one gets 3 yes and 3 no questions.
    scenes = generate_scenes(seed, pope_images, "pope_test", min_categories=3)
    pope_counts = pope.write_pope(scenes, out / "pope", seed)
    report.stage("scienceqa", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    stats = ObjectStats.from_scenes(scenes)
    splits = {name: scienceqa.generate_problems(seed, n, f"sqa_{name}_", stats) for name, n in sizes.items()}
    sqa_counts = scienceqa.write_scienceqa(splits, out / "scienceqa")
    return {"pope": pope_counts, "scienceqa": sqa_counts}


def calibration_samples(count: int = 64, seed: int = DEFAULT_SEED) -> list[CalibrationSample]:
    """World images with the benchmarks' prompts (POPE and ScienceQA alternating), from their own stream.

    Pruning criteria that need activations (Wanda-sp) see in-distribution inputs this way.
    """
    scenes = generate_scenes(seed, count, "calibration")
    problems = scienceqa.generate_problems(seed, count, "calibration_", ObjectStats.from_scenes(scenes))
    rng = random.Random(f"{seed}:calibration")
    samples = []
    for i, scene in enumerate(scenes):
        if i % 2 == 0:
            category = rng.choice(scene.categories if rng.random() < 0.5 else list(CATEGORY_NAMES))
            samples.append(CalibrationSample(render(scene), pope.prompt_text(pope.question_text(category))))
        else:
            problem_scene, problem = problems[i]
            text = scienceqa.prompt_text(problem.question, problem.choices, problem.hint)
            samples.append(CalibrationSample(render(problem_scene), text))
    return samples
