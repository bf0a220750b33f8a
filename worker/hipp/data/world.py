"""The synthetic world the testbed benchmarks are drawn from: object categories, scene types, rendering.

Each scene has a scene type (kitchen, street, ...) whose objects co-occur, on top of a long-tailed global
frequency over categories. That structure gives POPE's splits their meaning: a model that leans on priors says
"yes" to frequent categories (popular split) and to categories that usually appear with what is present
(adversarial split). Everything is deterministic given a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 25),
    "white": (245, 245, 245),
}

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")


@dataclass(frozen=True)
class Category:
    """An object category: a COCO-like name drawn as one shape in one colour."""

    name: str
    plural: str
    shape: str
    colour: str


# Ordered by global frequency (index 0 is the most frequent); the frequency falls off as a power law.
CATEGORIES: tuple[Category, ...] = (
    Category("person", "people", "circle", "red"),
    Category("car", "cars", "square", "blue"),
    Category("chair", "chairs", "triangle", "green"),
    Category("cup", "cups", "ring", "white"),
    Category("bottle", "bottles", "diamond", "cyan"),
    Category("dog", "dogs", "cross", "orange"),
    Category("book", "books", "square", "yellow"),
    Category("bowl", "bowls", "circle", "magenta"),
    Category("truck", "trucks", "triangle", "blue"),
    Category("bird", "birds", "cross", "yellow"),
    Category("clock", "clocks", "ring", "red"),
    Category("cat", "cats", "diamond", "orange"),
    Category("bus", "buses", "circle", "cyan"),
    Category("vase", "vases", "triangle", "magenta"),
    Category("knife", "knives", "cross", "white"),
    Category("horse", "horses", "square", "green"),
    Category("apple", "apples", "diamond", "red"),
    Category("bicycle", "bicycles", "ring", "green"),
    Category("spoon", "spoons", "square", "cyan"),
    Category("sheep", "sheep", "circle", "white"),
    Category("banana", "bananas", "triangle", "yellow"),
    Category("laptop", "laptops", "cross", "blue"),
    Category("cow", "cows", "ring", "orange"),
    Category("pizza", "pizzas", "diamond", "yellow"),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
FREQUENCY_EXPONENT = 0.9


@dataclass(frozen=True)
class SceneType:
    """A kind of scene: its background tint and the categories that typically appear in it."""

    name: str
    background: tuple[int, int, int]
    typical: tuple[str, ...]


SCENE_TYPES: tuple[SceneType, ...] = (
    SceneType("kitchen", (70, 58, 48), ("cup", "bottle", "bowl", "knife", "spoon", "apple", "banana", "pizza")),
    SceneType("street", (58, 58, 66), ("person", "car", "truck", "bus", "bicycle", "dog", "bird")),
    SceneType("office", (52, 60, 76), ("person", "chair", "book", "laptop", "clock", "cup", "bottle")),
    SceneType("farm", (50, 70, 44), ("horse", "sheep", "cow", "dog", "truck", "bird", "person")),
    SceneType("living room", (72, 54, 64), ("chair", "cat", "dog", "book", "vase", "clock", "laptop")),
    SceneType("picnic", (46, 66, 60), ("person", "apple", "banana", "pizza", "bowl", "bicycle", "bottle")),
)
# How much more likely a typical category is than the global frequency alone says. High, so that the
# co-occurrence prior is strong and the adversarial negatives are genuinely tempting.
TYPICAL_BOOST = 25.0
CATEGORY_COUNT_PROBS = {1: 0.15, 2: 0.25, 3: 0.3, 4: 0.3}
INSTANCE_COUNT_PROBS = {1: 0.75, 2: 0.17, 3: 0.08}
MAX_OBJECTS = 7
MIN_SIZE, MAX_SIZE = 11, 15


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its category and its bounding box (left, top, side length in pixels)."""

    category: str
    left: int
    top: int
    size: int

    @property
    def centre_x(self) -> float:
        return self.left + self.size / 2


@dataclass
class Scene:
    """A scene: an id, a scene type, its objects and a background shade jitter."""

    image_id: str
    scene_type: str
    objects: list[SceneObject] = field(default_factory=list)
    shade: int = 0

    @property
    def categories(self) -> list[str]:
        """Distinct categories present, in order of first appearance."""
        return list(dict.fromkeys(o.category for o in self.objects))

    def count(self, category: str) -> int:
        return sum(1 for o in self.objects if o.category == category)

    def to_json(self) -> dict[str, object]:
        return {
            "image_id": self.image_id,
            "scene_type": self.scene_type,
            "shade": self.shade,
            "objects": [[o.category, o.left, o.top, o.size] for o in self.objects],
        }


def global_weight(category: str) -> float:
    """Long-tailed global frequency weight of a category (rank 0 is the most frequent)."""
    return 1.0 / (CATEGORY_NAMES.index(category) + 1) ** FREQUENCY_EXPONENT


def _weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _sample_categories(rng: random.Random, scene_type: SceneType, k: int) -> list[str]:
    weights = {
        c: global_weight(c) * (TYPICAL_BOOST if c in scene_type.typical else 1.0) for c in CATEGORY_NAMES
    }
    chosen: list[str] = []
    for _ in range(k):
        pick = _weighted_choice(rng, weights)
        chosen.append(pick)
        del weights[pick]
    return chosen


def _place(rng: random.Random, size: int, taken: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """Find a spot for a square of ``size`` that keeps a 2-pixel gap from every placed object."""
    for _ in range(200):
        left = rng.randint(1, IMAGE_SIZE - size - 1)
        top = rng.randint(1, IMAGE_SIZE - size - 1)
        if all(
            left + size + 2 <= ol or ol + osz + 2 <= left or top + size + 2 <= ot or ot + osz + 2 <= top
            for ol, ot, osz in taken
        ):
            return left, top
    return None


def sample_scene(
    rng: random.Random,
    image_id: str,
    min_categories: int = 1,
    forced_count: int | None = None,
) -> Scene:
    """Draw one scene. ``forced_count`` gives the first category exactly that many instances."""
    scene_type = rng.choice(SCENE_TYPES)
    k = _weighted_choice(rng, {str(n): p for n, p in CATEGORY_COUNT_PROBS.items() if n >= min_categories})
    categories = _sample_categories(rng, scene_type, int(k))
    counts = [int(_weighted_choice(rng, {str(n): p for n, p in INSTANCE_COUNT_PROBS.items()})) for _ in categories]
    if forced_count is not None:
        counts[0] = forced_count
    scene = Scene(image_id=image_id, scene_type=scene_type.name, shade=rng.randint(-8, 8))
    taken: list[tuple[int, int, int]] = []
    for category, count in zip(categories, counts, strict=True):
        for _ in range(count):
            if len(scene.objects) >= MAX_OBJECTS and scene.count(category) > 0:
                break
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            spot = _place(rng, size, taken)
            if spot is None:
                break
            taken.append((spot[0], spot[1], size))
            scene.objects.append(SceneObject(category, spot[0], spot[1], size))
    if forced_count is not None and scene.count(categories[0]) != forced_count:
        return sample_scene(rng, image_id, min_categories, forced_count)
    if len(scene.categories) < min_categories:
        return sample_scene(rng, image_id, min_categories, forced_count)
    return scene


def generate_scenes(seed: int, n: int, prefix: str, min_categories: int = 1) -> list[Scene]:
    """``n`` scenes from their own random stream; the same (seed, prefix) always gives the same scenes."""
    rng = random.Random(f"{seed}:{prefix}")
    return [sample_scene(rng, f"{prefix}_{i:06d}", min_categories) for i in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = max(2, (x1 - x0) // 3)
        draw.rectangle((cx - w / 2, y0, cx + w / 2, y1), fill=fill)
        draw.rectangle((x0, cy - w / 2, x1, cy + w / 2), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=3)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB image."""
    base = next(t.background for t in SCENE_TYPES if t.name == scene.scene_type)
    background = tuple(max(0, min(255, c + scene.shade)) for c in base)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        category = BY_NAME[obj.category]
        box = (obj.left, obj.top, obj.left + obj.size - 1, obj.top + obj.size - 1)
        _draw_shape(draw, category.shape, box, COLOURS[category.colour])
    return image


def coverage_mask(scene: Scene, patch: int = 8) -> list[set[str]]:
    """For each patch (row-major), the categories whose bounding box covers at least a quarter of it."""
    grid = IMAGE_SIZE // patch
    cells: list[set[str]] = [set() for _ in range(grid * grid)]
    for obj in scene.objects:
        for row in range(grid):
            for col in range(grid):
                ox = min(obj.left + obj.size, (col + 1) * patch) - max(obj.left, col * patch)
                oy = min(obj.top + obj.size, (row + 1) * patch) - max(obj.top, row * patch)
                if ox > 0 and oy > 0 and ox * oy * 4 >= patch * patch:
                    cells[row * grid + col].add(obj.category)
    return cells
