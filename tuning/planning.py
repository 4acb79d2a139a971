"""Planning a sweep before any trial starts: the resources each trial holds, how many trials run at once, and
ASHA's ``max_t`` (asked of each trial's :class:`~sdf_ray.run_schedule.RunSchedule`, so it can never disagree
with the cadence the workers report at)."""

from __future__ import annotations

import dataclasses

from sdf_ray.config import TrainConfig
from sdf_ray.errors import ClusterError
from sdf_ray.run_schedule import RunSchedule
from tuning.search import SearchSpec, corner_configs

TRAINABLE_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}
"""Logical resources of a trial's own actor, which only drives its ``TorchTrainer`` (the Train workers hold the
CPUs and GPUs). A placement group cannot have an empty bundle, so the head bundle asks for a little memory and
no CPU."""


@dataclasses.dataclass(frozen=True)
class Plan:
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int
    max_t: int | None


def plan(cfg: TrainConfig, spec: SearchSpec, num_scenes: int, cluster: dict[str, float] | None = None) -> Plan:
    """Resources per trial, concurrency and ASHA's max_t; ClusterError when the cluster cannot hold them.

    ``cluster``: total resources (default: the connected Ray cluster's). The largest of the space's corner
    configs (``search.corner_configs``) sizes everything.
    """
    corners = corner_configs(spec, cfg)
    cpus = max(c.scaling.num_workers * c.scaling.cpus_per_worker for c in corners)
    gpus = max(c.scaling.num_workers if c.scaling.use_gpu else 0 for c in corners)
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    exists = f"the cluster has {have_cpus:g} CPU(s), {have_gpus:g} GPU(s)"
    need = f"{cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
    capacity = int(have_cpus // cpus) if cpus else spec.num_trials()
    if gpus:
        capacity = min(capacity, int(have_gpus // gpus))
    if capacity < 1:
        raise ClusterError(f"each trial needs {need} (scaling.num_workers x cpus_per_worker); {exists}")
    wanted = spec.max_concurrent_trials
    if wanted is not None and wanted > capacity:
        raise ClusterError(f"max_concurrent_trials={wanted} needs {wanted} x {need}; {exists}, enough for "
                           f"{capacity} trial(s) at once")
    concurrency = wanted or max(1, min(capacity, spec.num_trials()))
    return Plan(cpus_per_trial=cpus, gpus_per_trial=gpus, max_concurrent_trials=concurrency,
                max_t=_asha_max_t(spec, [RunSchedule.of(c, num_scenes) for c in corners]))


def _asha_max_t(spec: SearchSpec, schedules: list[RunSchedule]) -> int | None:
    """The search file's ``max_t``, else the longest trial counted in ASHA's time unit (for ASHA only)."""
    max_t = spec.scheduler.max_t
    if spec.scheduler.type != "asha" or max_t is not None:
        return max_t
    if spec.scheduler.time_attr == "train/epoch":
        longest = max(s.num_epochs for s in schedules)
    elif spec.scheduler.time_attr == "train/step":
        longest = max(s.total_steps for s in schedules)
    else:  # Tune's training_iteration: one per report
        longest = max(s.num_reports() for s in schedules)
    return max(longest, spec.scheduler.grace_period)
