"""One registry for extensions: adapters, criteria and allocators register and are found the same way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from worker.hipp.errors import OptionError, UnsupportedModelError
from worker.hipp.registry import Registry


class Thing:
    pass


def test_decorator_registers_under_each_name_and_returns_the_object():
    things: Registry[type[Thing]] = Registry("thing", OptionError)

    @things.register("a", "b")
    class A(Thing):
        pass

    @things.register("c")
    class C(Thing):
        pass

    assert things.get("a") is A and things.get("b") is A and things.get("c") is C
    assert things.names() == ["a", "b", "c"]
    assert list(things) == ["a", "b", "c"] and len(things) == 3
    assert "a" in things and "z" not in things
    assert things.find("z") is None


def test_unknown_name_raises_the_registry_error_listing_known_names():
    things: Registry[int] = Registry("thing", OptionError)
    things.add("one", 1)
    things.add("two", 2)
    with pytest.raises(OptionError, match=r"unknown thing 'three'; use one of one, two"):
        things.get("three")


def test_a_name_cannot_be_taken_twice_but_registering_again_is_harmless():
    things: Registry[object] = Registry("thing")
    first, second = object(), object()
    things.add("x", first)
    things.add("x", first)
    with pytest.raises(ValueError, match="'x' is already registered"):
        things.add("x", second)
    with pytest.raises(ValueError, match="at least one name"):
        things.register()


def test_the_registry_imports_nothing_from_the_engine():
    tree = ast.parse((Path(__file__).resolve().parent.parent / "worker" / "hipp" / "registry.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m and m.startswith("worker")}


def test_criteria_are_registered_and_built_by_name():
    from worker.hipp.pruning.criteria import CRITERIA, MagnitudeCriterion, RandomCriterion, get_criterion

    assert CRITERIA.names() == ["magnitude", "wanda-sp", "random"]
    assert isinstance(get_criterion("magnitude", seed=4), MagnitudeCriterion)
    random = get_criterion("random", seed=4)
    assert isinstance(random, RandomCriterion) and random.seed == 4
    with pytest.raises(OptionError, match="unknown criterion 'snip'; use one of magnitude, wanda-sp, random"):
        get_criterion("snip")


def test_allocators_are_registered_and_built_by_name():
    import worker.hipp.pruning.baselines.flap  # noqa: F401 (registers flap-paper; order-independent)
    from worker.hipp.pruning import baselines  # noqa: F401  (registers the faithful baselines, as the planner does)
    from worker.hipp.pruning.allocators import ALLOCATORS, OWLAllocator, RandomAllocator, get_allocator

    assert ALLOCATORS.names()[:5] == ["uniform", "owl", "flap", "random", "visual"]
    assert {"wanda-sp", "owl-paper", "llm-pruner", "flap-paper"} <= set(ALLOCATORS.names())
    owl = get_allocator("owl", seed=9)
    assert isinstance(owl, OWLAllocator) and owl.lam == pytest.approx(0.08)
    random = get_allocator("random", seed=9)
    assert isinstance(random, RandomAllocator) and random.seed == 9
    with pytest.raises(OptionError, match="unknown allocation 'owls'"):
        get_allocator("owls")


def test_adapters_are_registered_by_model_type():
    from worker.hipp.models.adapters import ADAPTERS, adapter_class_for, registered_model_types
    from worker.hipp.models.adapters.llava import LlavaAdapter

    assert adapter_class_for("llava") is LlavaAdapter is ADAPTERS.get("llava_next")
    assert adapter_class_for("gpt2") is None
    assert {"llava", "qwen2_vl", "qwen2_5_vl"} <= set(registered_model_types())
    with pytest.raises(UnsupportedModelError, match="unknown model type 'gpt2'"):
        ADAPTERS.get("gpt2")
