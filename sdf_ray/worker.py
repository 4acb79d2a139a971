"""The only Ray Train boundary: ``train_fn_per_worker`` runs on every worker of a ``TorchTrainer``.

It rebuilds the config from the dict the driver validated, resumes from Ray's latest checkpoint when
there is one, runs the Ray-free training loop, reports metrics (all ranks, same count) and
checkpoints (rank 0 writes them), and rank 0 writes ``summary.json`` at the end.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from sdf_ray import checkpoint as ckpt
from sdf_ray.config import from_dict, to_yaml
from sdf_ray.dist import default_collectives
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from sdf_ray.ray_session import quiet_train_report_log
from sdf_ray.run_files import RESOLVED_CONFIG_FILE, SUMMARY_FILE, WORKER_GROUP_STARTS_FILE
from sdf_ray.train_loop import run_training


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


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = from_dict(loop_config["train_config"])
    run_dir = Path(loop_config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)  # on a node that never saw the driver's mkdir
    rank = ray.train.get_context().get_world_rank()
    _setup_logging(cfg.logging.level, rank)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    coll = default_collectives()

    resume_from = None
    latest = ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as directory:
            resume_from = ckpt.load(directory)

    def reporter(metrics: dict[str, Any], snapshot: dict[str, Any] | None) -> None:
        if snapshot is not None and rank == 0:
            with tempfile.TemporaryDirectory(prefix="sdf-ray-ckpt-") as tmp:
                ckpt.save(snapshot, tmp)
                (Path(tmp) / RESOLVED_CONFIG_FILE).write_text(to_yaml(cfg))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    result = run_training(cfg, coll, device, reporter, run_dir, resume_from=resume_from,
                          restarts=count_worker_group_start(run_dir) if rank == 0 else 0)
    if rank == 0:
        write_json_atomic(run_dir / SUMMARY_FILE, result.as_summary(cfg))
