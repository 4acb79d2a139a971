"""Packed sweeps: fractional GPUs per worker, the planner's arithmetic and its GPU-memory check (no Ray, no GPU)."""

from __future__ import annotations

import pytest

from sdf_ray import config as C
from sdf_ray.errors import ClusterError, ConfigError
from sdf_ray.launch import worker_resources
from tests.helpers import tiny_config
from tuning import planning, search

GRID16 = {"space": {"optim.decoder_lr": {"grid": [1e-4 * (i + 1) for i in range(16)]}}, "scheduler": "fifo"}


def gpu_cfg(share: float = 1.0, **overrides):
    return tiny_config(**{"scaling.num_workers": 1, "scaling.use_gpu": True, "scaling.gpus_per_worker": share,
                          **overrides})


def config_problems(**overrides) -> list[str]:
    with pytest.raises(ConfigError) as info:
        tiny_config(**overrides)
    return info.value.problems


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, 0.2, 0.125, 0.1, 1 / 3, 0.333])
def test_shares_of_one_gpu_are_accepted(share):
    cfg = gpu_cfg(share)
    assert worker_resources(cfg) == {"CPU": 1.0, "GPU": share}


def test_worker_resources_hold_no_gpu_on_cpu_runs():
    assert worker_resources(tiny_config()) == {"CPU": 1.0}


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"scaling.gpus_per_worker": 0.25}, "applies only with scaling.use_gpu: true"),
    ({"scaling.use_gpu": True, "scaling.num_workers": 1, "scaling.gpus_per_worker": 0.3},
     "0.3 does not split a GPU evenly"),
    ({"scaling.use_gpu": True, "scaling.num_workers": 1, "scaling.gpus_per_worker": 0.4},
     "0.4 does not split a GPU evenly"),
    ({"scaling.use_gpu": True, "scaling.num_workers": 1, "scaling.gpus_per_worker": 2},
     "a worker uses one GPU"),
    ({"scaling.use_gpu": True, "scaling.num_workers": 2, "scaling.gpus_per_worker": 0.5},
     "two ranks could share one GPU"),
    ({"scaling.use_gpu": True, "scaling.num_workers": 1, "scaling.gpus_per_worker": 0}, "must be > 0"),
])
def test_a_bad_share_of_a_gpu_is_one_clear_error(overrides, fragment):
    problems = config_problems(**overrides)
    assert len(problems) == 1 and "scaling.gpus_per_worker" in problems[0] and fragment in problems[0], problems


def test_sixteen_quarter_gpu_trials_run_four_at_a_time_on_one_gpu():
    spec = search.from_dict(GRID16)
    p = planning.plan(gpu_cfg(0.25), spec, num_scenes=8, cluster={"CPU": 16.0, "GPU": 1.0}, gpu_memory_gib=None)
    assert (p.cpus_per_trial, p.gpus_per_trial, p.max_concurrent_trials) == (1.0, 0.25, 4)
    assert p.describe() == "1 CPU(s) and 0.25 GPU(s) each"
    # Eight GPUs: 32 slots, but only 16 trials; CPUs bound it as well.
    assert planning.plan(gpu_cfg(0.25), spec, 8, {"CPU": 64.0, "GPU": 8.0}, None).max_concurrent_trials == 16
    assert planning.plan(gpu_cfg(0.25), spec, 8, {"CPU": 6.0, "GPU": 8.0}, None).max_concurrent_trials == 6
    # Floats: 1 / 0.1 = 9.999...; ten tenths of a GPU are ten trials.
    assert planning.plan(gpu_cfg(0.1), spec, 8, {"CPU": 64.0, "GPU": 1.0}, None).max_concurrent_trials == 10
    assert planning.plan(gpu_cfg(1 / 3), spec, 8, {"CPU": 64.0, "GPU": 2.0}, None).max_concurrent_trials == 6


def test_whole_gpu_trials_and_too_few_gpus():
    spec = search.from_dict(GRID16)
    assert planning.plan(gpu_cfg(), spec, 8, {"CPU": 16.0, "GPU": 1.0}, None).max_concurrent_trials == 1
    with pytest.raises(ClusterError, match=r"each trial needs 1 CPU\(s\) and 0.5 GPU\(s\).*has 16 CPU\(s\), 0 GPU"):
        planning.plan(gpu_cfg(0.5), spec, 8, {"CPU": 16.0}, None)
    wanted = search.from_dict({**GRID16, "max_concurrent_trials": 5})
    with pytest.raises(ClusterError, match=r"max_concurrent_trials=5 .* enough for 4 trial"):
        planning.plan(gpu_cfg(0.25), wanted, 8, {"CPU": 16.0, "GPU": 1.0}, None)


def test_the_planner_refuses_to_pack_more_workers_than_gpu_memory_holds():
    spec = search.from_dict(GRID16)
    cluster = {"CPU": 16.0, "GPU": 1.0}
    # 4 x 30 GiB on a 139 GiB GPU fits; 4 x 40 GiB does not: the error names the share that fits (3 per GPU).
    p = planning.plan(gpu_cfg(0.25, **{"scaling.gpu_memory_per_worker_gib": 30}), spec, 8, cluster, 139.0)
    assert p.max_concurrent_trials == 4 and p.gpu_memory_gib == 139.0
    with pytest.raises(ClusterError, match=r"puts 4 workers on one GPU.*160 GiB.*139.0 GiB: use "
                                           r"scaling.gpus_per_worker=0.3333 \(3 per GPU\)"):
        planning.plan(gpu_cfg(0.25, **{"scaling.gpu_memory_per_worker_gib": 40}), spec, 8, cluster, 139.0)
    with pytest.raises(ClusterError, match="does not fit on one GPU at all"):
        planning.plan(gpu_cfg(0.5, **{"scaling.gpu_memory_per_worker_gib": 200}), spec, 8, cluster, 139.0)
    # Unknown memory (no GPU visible to the driver, or no figure in the config): not checked.
    planning.plan(gpu_cfg(0.25, **{"scaling.gpu_memory_per_worker_gib": 40}), spec, 8, cluster, None)
    planning.plan(gpu_cfg(0.25), spec, 8, cluster, 139.0)


def test_a_space_that_searches_the_share_is_sized_by_its_largest_corner():
    spec = search.from_dict({"space": {"scaling.gpus_per_worker": {"choice": [0.25, 0.5]}}, "num_samples": 8})
    p = planning.plan(gpu_cfg(0.25), spec, 8, {"CPU": 16.0, "GPU": 1.0}, None)
    assert (p.gpus_per_trial, p.max_concurrent_trials) == (0.5, 2)


def test_local_gpu_memory_is_none_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(planning.shutil, "which", lambda name: None)
    assert planning.local_gpu_memory_gib() is None


def test_cluster_check_counts_gpu_shares(monkeypatch):
    """`sdf-ray train` with a quarter GPU needs a quarter of a GPU; with none in the cluster it is one error."""
    import types

    from sdf_ray import launch

    fake_ray = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0},
                                     nodes=lambda: [{"Alive": True}])
    monkeypatch.setitem(__import__("sys").modules, "ray", fake_ray)
    with pytest.raises(ClusterError, match=r"gpus_per_worker=0.25 with use_gpu needs 0.25 GPU\(s\); the cluster has "
                                           r"1 node\(s\), 4 CPU\(s\), 0 GPU"):
        launch.check_cluster_resources(gpu_cfg(0.25))
    fake_ray.cluster_resources = lambda: {"CPU": 4.0, "GPU": 1.0}
    launch.check_cluster_resources(gpu_cfg(0.25))
    assert C.TrainConfig().scaling.gpus_per_worker == 1.0
