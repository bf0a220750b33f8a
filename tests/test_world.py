"""The synthetic world: determinism, scene structure, co-occurrence and frequency priors, rendering."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from worker.hipp.data.world import (
    BY_NAME,
    CATEGORIES,
    CATEGORY_NAMES,
    COLOURS,
    IMAGE_SIZE,
    SCENE_TYPES,
    coverage_mask,
    generate_scenes,
    render,
    sample_scene,
)


def test_same_seed_same_scenes_and_pixels():
    a = generate_scenes(3, 40, "t")
    b = generate_scenes(3, 40, "t")
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    assert all(np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a, b, strict=True))


def test_different_seed_or_prefix_gives_different_scenes():
    base = [s.to_json()["objects"] for s in generate_scenes(3, 20, "t")]
    assert base != [s.to_json()["objects"] for s in generate_scenes(4, 20, "t")]
    assert base != [s.to_json()["objects"] for s in generate_scenes(3, 20, "u")]


def test_categories_are_distinct_shape_colour_pairs():
    pairs = {(c.shape, c.colour) for c in CATEGORIES}
    assert len(pairs) == len(CATEGORIES)
    assert len(set(CATEGORY_NAMES)) == len(CATEGORIES)


def test_objects_do_not_overlap_and_stay_inside():
    for scene in generate_scenes(0, 200, "overlap"):
        boxes = [(o.left, o.top, o.left + o.size, o.top + o.size) for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_min_categories_and_forced_count():
    assert all(len(s.categories) >= 3 for s in generate_scenes(1, 100, "min3", min_categories=3))
    rng = random.Random(0)
    for count in (1, 2, 3):
        scene = sample_scene(rng, "x", forced_count=count)
        assert scene.count(scene.objects[0].category) == count


def test_global_frequency_is_long_tailed():
    freq = Counter(c for s in generate_scenes(0, 3000, "freq") for c in s.categories)
    head = sum(freq[c] for c in CATEGORY_NAMES[:4])
    tail = sum(freq[c] for c in CATEGORY_NAMES[-4:])
    assert head > 3 * tail


def test_scene_types_make_typical_objects_co_occur():
    scenes = generate_scenes(0, 3000, "cooc")
    kitchen = next(t for t in SCENE_TYPES if t.name == "kitchen")
    in_kitchen = [s for s in scenes if s.scene_type == "kitchen"]
    elsewhere = [s for s in scenes if s.scene_type not in ("kitchen", "picnic", "office")]
    # A kitchen object ("spoon") appears far more often in kitchens than in unrelated scene types.
    assert "spoon" in kitchen.typical
    rate_kitchen = sum("spoon" in s.categories for s in in_kitchen) / len(in_kitchen)
    rate_elsewhere = sum("spoon" in s.categories for s in elsewhere) / len(elsewhere)
    assert rate_kitchen > 5 * rate_elsewhere


def test_render_draws_each_object_in_its_colour():
    scene = generate_scenes(0, 1, "render")[0]
    pixels = np.asarray(render(scene))
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    for obj in scene.objects:
        patch = pixels[obj.top : obj.top + obj.size, obj.left : obj.left + obj.size].reshape(-1, 3)
        colour = np.array(COLOURS[BY_NAME[obj.category].colour])
        assert (np.abs(patch - colour).sum(axis=1) == 0).sum() >= 10


def test_coverage_mask_marks_the_patches_under_an_object():
    scene = generate_scenes(0, 1, "cover")[0]
    cells = coverage_mask(scene, patch=16)
    assert len(cells) == 16
    for obj in scene.objects:
        col = int((obj.left + obj.size / 2) // 16)
        row = int((obj.top + obj.size / 2) // 16)
        assert obj.category in cells[row * 4 + col]
    assert set().union(*cells) <= set(scene.categories)
