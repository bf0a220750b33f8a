"""Shared fixtures: tiny LLaVA models built from configs (no downloads) and calibration batches."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _light_client_importable() -> None:
    """An editable install made before client/ existed maps only the packages it found then, so it lacks
    ``hipp_client`` until ``pip install -e .`` runs again: take this checkout's, here and in the processes the
    tests start. (tests/service/test_client.py checks that the project's own build ships the package.)"""
    if importlib.util.find_spec("hipp_client") is not None:
        return
    client = str(Path(__file__).resolve().parents[1] / "client")
    sys.path.insert(0, client)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (client, os.environ.get("PYTHONPATH")) if p)


_light_client_importable()

import pytest  # noqa: E402
import torch  # noqa: E402

TORCH_THREADS = 2
torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():  # type: ignore[no-untyped-def]
    """Every test starts with the same thread count (the testbed recipe sets its own and keeps it): float
    reductions, and so logits compared bit for bit with a subprocess, depend on it."""
    torch.set_num_threads(TORCH_THREADS)
    yield


@pytest.fixture
def tiny_gqa():
    from worker.hipp.models.loading import load_model

    return load_model("tiny-llava")


@pytest.fixture
def tiny_mha():
    from worker.hipp.models.loading import load_model

    return load_model("tiny-llava-mha")


@pytest.fixture
def tiny_bias():
    from worker.hipp.models.loading import load_model

    return load_model("tiny-llava-bias")


@pytest.fixture
def tiny_qwen25():
    from worker.hipp.models.loading import load_model

    return load_model("tiny-qwen2.5-vl")


@pytest.fixture
def tiny_qwen2():
    from worker.hipp.models.loading import load_model

    return load_model("tiny-qwen2-vl")


def calibration_batch(loaded, n: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    from worker.hipp.data.calibration import iter_batches, synthetic_samples

    return next(iter_batches(loaded, synthetic_samples(n, seed=seed), batch_size=n))


@pytest.fixture
def batch_for():
    return calibration_batch
