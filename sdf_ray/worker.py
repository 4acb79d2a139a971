"""The only Ray Train boundary: ``train_fn_per_worker`` runs on every worker of a ``TorchTrainer``.

It rebuilds the config from the dict the driver validated, resolves its ``auto`` settings for this worker's
device, resumes from Ray's latest checkpoint when there is one, runs the Ray-free training loop, reports metrics
(all ranks, same count) and checkpoints (rank 0 writes them), and rank 0 writes ``summary.json`` at the end, with
the resolved settings and the start-up marks (``sdf_ray.startup``).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from sdf_ray import checkpoint as ckpt
from sdf_ray.config import TrainConfig, from_dict, to_yaml
from sdf_ray.device_settings import describe, resolve_for_device, use_compile_cache
from sdf_ray.dist import default_collectives
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from sdf_ray.ray_session import current_runtime_env_digest, quiet_train_report_log
from sdf_ray.run_files import RESOLVED_CONFIG_FILE, SUMMARY_FILE, WORKER_GROUP_STARTS_FILE
from sdf_ray.startup import (
    StartupClock,
    controller_runtime_env,
    finish_worker_imports,
    process_start_time,
    remote_marks,
    worker_imports_started,
)
from sdf_ray.train_loop import run_training

log = logging.getLogger("sdf_ray")


def count_worker_group_start(run_dir: Path) -> int:
    """Rank 0 counts worker-group starts in this ``fit()`` (the driver resets the file); returns restarts."""
    path = run_dir / WORKER_GROUP_STARTS_FILE
    starts = int(path.read_text() or 0) + 1 if path.exists() else 1
    write_text_atomic(path, str(starts))
    return starts - 1


def _setup_logging(level: str, rank: int) -> None:
    if level != "DEBUG":
        quiet_train_report_log()
    logger = logging.getLogger("sdf_ray")
    logger.setLevel(level if rank == 0 else "WARNING")
    if not any(getattr(h, "_sdf_ray", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[sdf-ray] %(message)s"))
        handler._sdf_ray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


class _Timeline:
    """Rank 0's start-up marks, continued from the driver's (``loop_config["startup"]``), and the time spent on
    checkpoints."""

    def __init__(self, loop_config: dict[str, Any], device: torch.device) -> None:
        self.clock = StartupClock.from_dict(loop_config["startup"]) if "startup" in loop_config else StartupClock()
        self.clock.mark("worker_process_started", process_start_time())
        for name, at in remote_marks().items():  # Ray Train's controller: worker group up, process group ready
            self.clock.mark(name, at)
        self.device = device
        self.checkpoint_s = 0.0
        self.num_checkpoints = 0

    def phase(self, name: str) -> None:
        """``run_training``'s ``on_phase`` hook; the step marks wait for the device, so they are real."""
        if name in ("first_step_done", "last_step_done") and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.clock.mark(name, keep_first=name != "last_step_done")


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    finish_worker_imports()  # done already when sdf-ray's backend set up the process group; never compile beside it
    requested = from_dict(loop_config["train_config"])
    run_dir = Path(loop_config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)  # on a node that never saw the driver's mkdir
    rank = ray.train.get_context().get_world_rank()
    _setup_logging(requested.logging.level, rank)
    device = ray.train.torch.get_device() if requested.scaling.use_gpu else torch.device("cpu")
    timeline = _Timeline(loop_config, device)
    timeline.clock.mark("train_fn_start")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = resolve_for_device(requested, device)
    cache_env = use_compile_cache(loop_config["compile_cache_dir"]) if "compile_cache_dir" in loop_config else {}
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        log.info("device %s (%s): %s", device, name, describe(requested, cfg))
    coll = default_collectives()

    resume_from = None
    latest = ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as directory:
            resume_from = ckpt.load(directory)

    def reporter(metrics: dict[str, Any], snapshot: dict[str, Any] | None) -> None:
        if snapshot is not None and rank == 0:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="sdf-ray-ckpt-") as tmp:
                ckpt.save(snapshot, tmp)
                # The config the run was started with (``auto`` unresolved), as in the run directory.
                (Path(tmp) / RESOLVED_CONFIG_FILE).write_text(to_yaml(requested))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            timeline.checkpoint_s += time.perf_counter() - started
            timeline.num_checkpoints += 1
        else:
            ray.train.report(metrics)

    result = run_training(cfg, coll, device, reporter, run_dir, resume_from=resume_from,
                          restarts=count_worker_group_start(run_dir) if rank == 0 else 0, on_phase=timeline.phase)
    timeline.clock.mark("training_done")
    if rank == 0:
        write_json_atomic(run_dir / SUMMARY_FILE, _summary(result.as_summary(cfg), cfg, device, timeline, cache_env))


def _summary(summary: dict[str, Any], cfg: TrainConfig, device: torch.device, timeline: _Timeline,
             cache_env: dict[str, str]) -> dict[str, Any]:
    """The loop's summary plus what ran (resolved settings, device), where the time went and the memory used."""
    extra: dict[str, Any] = {
        "samples_trained": int(summary["steps"]) * cfg.data.scenes_per_step * cfg.data.samples_per_scene,
        "precision": cfg.optim.precision, "compile": cfg.model.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "perf/checkpoint_seconds": round(timeline.checkpoint_s, 3), "perf/num_checkpoints": timeline.num_checkpoints,
        "compile_cache": cache_env,
        # Whether Ray ran sdf-ray's setup hook in this worker process (ray_session.train_worker_runtime_env).
        "startup_worker_imports_preloaded": worker_imports_started(),
        # The runtime envs the raylet matched Ray Train's processes on, against those prestarted (cli.cmd_train).
        "startup_runtime_envs": {who: digest for who, digest in (("controller", controller_runtime_env()),
                                                                 ("rank0", current_runtime_env_digest())) if digest},
    }
    if device.type == "cuda":
        extra["perf/peak_gpu_memory_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return {**summary, **extra, **timeline.clock.summary_fields()}
