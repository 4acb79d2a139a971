"""Shared fixtures: one embedded Ray per test module that needs it, generated datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import forget_torch_default_cache_dirs

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """An embedded local Ray (2 CPUs, 127.0.0.1 only) shared by a test module, shut down after it."""
    import ray

    from sdf_ray.ray_session import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    forget_torch_default_cache_dirs()
    connect_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdf_ray.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    synth_dataset(out, num_scenes=8, samples_per_scene=512, seed=0)
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is available (the GPU machine); elsewhere they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
