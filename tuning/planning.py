"""Planning a sweep before any trial starts: the resources each trial holds, how many trials run at once, and
ASHA's ``max_t`` (asked of each trial's :class:`~sdf_ray.run_schedule.RunSchedule`, so it can never disagree
with the cadence the workers report at).

Packing: a trial holds ``scaling.num_workers x gpus_per_worker`` GPUs, so trials of one worker at
``gpus_per_worker: 0.25`` run four to a GPU: concurrency = floor(cluster GPUs / GPUs per trial), bounded by the
CPUs as well (``num_workers x cpus_per_worker`` per trial). GPU memory is not a Ray resource; when the config
states what one worker needs (``scaling.gpu_memory_per_worker_gib``, a previous run's
``perf/peak_gpu_memory_gib`` plus about 1 GiB of CUDA context), the plan refuses a share that puts more workers
on one GPU than its memory holds, asking for the largest share that fits instead.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
from typing import Literal

from sdf_ray.config import TrainConfig
from sdf_ray.errors import ClusterError
from sdf_ray.run_schedule import RunSchedule
from tuning.search import SearchSpec, corner_configs

TRAINABLE_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}
"""Logical resources of a trial's own actor, which only drives its ``TorchTrainer`` (the Train workers hold the
CPUs and GPUs). A placement group cannot have an empty bundle, so the head bundle asks for a little memory and
no CPU."""

_EPS = 1e-6  # resource arithmetic in floats: 1 / 0.1 is 9.999...


@dataclasses.dataclass(frozen=True)
class Plan:
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int
    max_t: int | None
    gpu_memory_gib: float | None = None
    """Memory of the smallest GPU when the planner could see one (the packing check), else None."""

    def describe(self) -> str:
        """``1 CPU(s) and 0.25 GPU(s) each``: what one trial holds."""
        return f"{self.cpus_per_trial:g} CPU(s)" + (f" and {self.gpus_per_trial:g} GPU(s)" if self.gpus_per_trial
                                                      else "") + " each"


def fits(have: float, need: float) -> int:
    """How many ``need``-sized shares ``have`` holds (0 when need is 0 is the caller's business)."""
    return int(math.floor(have / need + _EPS))


def local_gpu_memory_gib() -> float | None:
    """Memory of the smallest GPU on this machine, by ``nvidia-smi`` (no CUDA context in the driver); None
    without one. On a cluster whose driver has no GPU, the packing check is skipped (the plan says so)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        sizes_mib = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes_mib) / 1024 if sizes_mib else None


def check_gpu_memory(cfg: TrainConfig, gpu_memory_gib: float | None) -> None:
    """ClusterError when ``gpus_per_worker`` packs more workers on one GPU than its memory holds."""
    s = cfg.scaling
    if not s.use_gpu or s.gpus_per_worker >= 1 or not s.gpu_memory_per_worker_gib or not gpu_memory_gib:
        return
    per_gpu = fits(1.0, s.gpus_per_worker)
    if per_gpu * s.gpu_memory_per_worker_gib <= gpu_memory_gib:
        return
    room = int(gpu_memory_gib // s.gpu_memory_per_worker_gib)
    advice = (f"use scaling.gpus_per_worker={1 / room:.4g} ({room} per GPU)" if room >= 1
              else "a worker does not fit on one GPU at all")
    raise ClusterError(f"scaling.gpus_per_worker={s.gpus_per_worker:g} puts {per_gpu} workers on one GPU, "
                       f"{per_gpu} x gpu_memory_per_worker_gib={s.gpu_memory_per_worker_gib:g} GiB = "
                       f"{per_gpu * s.gpu_memory_per_worker_gib:g} GiB, more than the GPU's "
                       f"{gpu_memory_gib:.1f} GiB: {advice}")


def plan(cfg: TrainConfig, spec: SearchSpec, num_scenes: int, cluster: dict[str, float] | None = None,
         gpu_memory_gib: float | Literal["local"] | None = "local") -> Plan:
    """Resources per trial, concurrency and ASHA's max_t; ClusterError when the cluster cannot hold them.

    ``cluster``: total resources (default: the connected Ray cluster's). ``gpu_memory_gib``: memory of one GPU
    (``local``: :func:`local_gpu_memory_gib`; None skips the packing check). The largest of the space's corner
    configs (``search.corner_configs``) sizes everything.
    """
    corners = corner_configs(spec, cfg)
    cpus = max(c.scaling.num_workers * c.scaling.cpus_per_worker for c in corners)
    gpus = max(c.scaling.num_workers * c.scaling.gpus_per_worker if c.scaling.use_gpu else 0.0 for c in corners)
    gpu_memory = (local_gpu_memory_gib() if gpus else None) if gpu_memory_gib == "local" else gpu_memory_gib
    for corner in corners:
        check_gpu_memory(corner, gpu_memory)
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    exists = f"the cluster has {have_cpus:g} CPU(s), {have_gpus:g} GPU(s)"
    need = f"{cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
    capacity = fits(have_cpus, cpus) if cpus else spec.num_trials()
    if gpus:
        capacity = min(capacity, fits(have_gpus, gpus))
    if capacity < 1:
        raise ClusterError(f"each trial needs {need} (scaling.num_workers x cpus_per_worker"
                           f"{' / gpus_per_worker' if gpus else ''}); {exists}")
    wanted = spec.max_concurrent_trials
    if wanted is not None and wanted > capacity:
        raise ClusterError(f"max_concurrent_trials={wanted} needs {wanted} x {need}; {exists}, enough for "
                           f"{capacity} trial(s) at once")
    concurrency = wanted or max(1, min(capacity, spec.num_trials()))
    return Plan(cpus_per_trial=cpus, gpus_per_trial=gpus, max_concurrent_trials=concurrency,
                max_t=_asha_max_t(spec, [RunSchedule.of(c, num_scenes) for c in corners]),
                gpu_memory_gib=gpu_memory)


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
