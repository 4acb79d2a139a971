"""One guarded training step (``train_step``) and the loop that runs a whole run (``run_training``), Ray-free.

The loop runs the same on 1 process (``LocalCollectives``) and on N ranks (``TorchCollectives``): every
rank executes the same collectives at the same steps, and every decision that changes control flow
(log, checkpoint, roll back, stop) is taken from step numbers or from voted values, never from
rank-local data. ``worker.py`` adapts it to Ray Train.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sdf_ray import checkpoint as ckpt
from sdf_ray.config import InjectConfig, TrainConfig
from sdf_ray.data.format import PackedScenes, load_scenes, read_manifest
from sdf_ray.data.sampler import SceneSampler, shard_scene_ids
from sdf_ray.device_settings import resolve_for_device
from sdf_ray.dist import Collectives
from sdf_ray.errors import DataError
from sdf_ray.guard import StepVerdict, conditional_step, vote_and_clip
from sdf_ray.loss import code_reg_weight, sdf_loss
from sdf_ray.metrics_log import IntervalClock, MetricsWriter, collect_metrics, progress_line, start_line
from sdf_ray.schedules import group_lrs
from sdf_ray.train_state import TrainState, build_state, configure_precision, precision_context
from sdf_ray.validation import Validator

log = logging.getLogger("sdf_ray")

CRASH_MARKER = ".crash-injected"


class Reporter(Protocol):
    """Where metrics (every logging interval) and checkpoints go. Called on every rank, same count."""

    def __call__(self, metrics: dict[str, Any], snapshot: dict[str, Any] | None) -> None: ...


def _inject_value(inj: InjectConfig) -> float:
    return math.nan if inj.value == "nan" else math.inf


def train_step(state: TrainState, scene_idx_B: torch.Tensor, xyz_N3: torch.Tensor, sdf_N: torch.Tensor,
               reg_weight: float, injections: Sequence[InjectConfig] = (), *, code_per_sample: bool = False,
               ) -> tuple[StepVerdict, torch.Tensor, torch.Tensor]:
    """One guarded optimizer step. Returns (verdict, loss, l1) as device tensors; no host sync.

    ``code_per_sample`` feeds the decoder a code per sample instead of one per scene (the same function:
    the unfactorised cost, for benchmarks and tests)."""
    cfg, coll = state.cfg, state.coll
    num_scenes_B = scene_idx_B.shape[0]
    samples_per_scene = xyz_N3.shape[0] // num_scenes_B
    state.optimizer.zero_grad(set_to_none=False)

    # 1. forward and backward on every rank, always (skipping backward would hang the all-reduce).
    with precision_context(cfg, state.device):
        latent_BL = state.latents(scene_idx_B)
        codes_B1L = latent_BL.unsqueeze(1)
        if code_per_sample:
            codes_B1L = codes_B1L.expand(-1, samples_per_scene, -1).contiguous()
        pred_N = state.decoder(codes_B1L, xyz_N3.view(num_scenes_B, samples_per_scene, 3)).reshape(-1)
        loss, l1 = sdf_loss(pred_N, sdf_N, latent_BL, cfg.loss, reg_weight)
    for inj in injections:
        if inj.site == "loss":
            loss = loss + _inject_value(inj)
    loss.backward()

    latent_grad = state.latents.codes.grad
    assert latent_grad is not None
    if coll.world_size > 1:
        # Codes are rank-local and DDP does not average them: scale so the step is the gradient of the
        # global mean loss (N workers then match 1 worker on the same global batch).
        latent_grad.mul_(1.0 / coll.world_size)
    decoder_grads = [p.grad for p in state.decoder_params if p.grad is not None]
    for inj in injections:
        if inj.site == "grad":
            decoder_grads[0].view(-1)[0] = _inject_value(inj)  # after the all-reduce: only this rank sees it
        elif inj.site == "latent":
            latent_grad[scene_idx_B[0]] = _inject_value(inj)

    # 2.-6. vote, global norm, clip, conditional step, projection, counters: all on the device.
    local_bad = ~torch.isfinite(loss.detach())
    if cfg.guard.enabled:
        verdict = vote_and_clip(decoder_grads, [latent_grad], local_bad, coll, cfg.guard.grad_clip)
    else:
        verdict = StepVerdict(bad=torch.zeros((), dtype=torch.bool, device=state.device),
                              grad_norm=torch.full((), math.nan, device=state.device))
    conditional_step(state.optimizer, verdict.bad)
    state.latents.project_(verdict.bad)
    state.counters.update_(verdict, cfg.guard.grad_clip)
    zero = torch.zeros((), dtype=torch.float64, device=state.device)
    state.metric_acc.add_(torch.where(verdict.bad, zero, torch.stack(
        [loss.detach(), l1.detach(), verdict.grad_norm.detach()]).double()))
    return verdict, loss, l1


def start_epoch(state: TrainState, epoch: int) -> float:
    """Set the epoch's learning rates; returns its code-regularisation weight."""
    lrs = group_lrs(state.cfg.optim, epoch)
    for group in state.optimizer.param_groups:
        group["lr"] = lrs[group["name"]]
    return code_reg_weight(state.cfg.loss, epoch)


def injections_at(cfg: TrainConfig, step: int, rank: int) -> list[InjectConfig]:
    """``debug.inject``: the non-finite values this rank injects into this step."""
    return [inj for inj in cfg.debug.inject
            if inj.rank == rank and (inj.step == step or (inj.repeat and step > inj.step))]


def maybe_crash(cfg: TrainConfig, step: int, rank: int, run_dir: str | Path) -> None:
    """``debug.crash``: this rank exits abruptly at the chosen step, once per run directory (a marker file
    keeps the restarted worker group from crashing again), to exercise Ray's failure handling."""
    crash = cfg.debug.crash
    if crash is None or crash.step != step or crash.rank != rank:
        return
    marker = Path(run_dir) / CRASH_MARKER
    if not marker.exists():
        marker.write_text(f"worker rank {rank} crashed on purpose at step {step}\n")
        log.error("debug.crash: rank %d exits abruptly at step %d", rank, step)
        os._exit(1)


def roll_back(state: TrainState, good_snapshot: dict[str, Any], clock: IntervalClock) -> str:
    """Restore the last good snapshot but resume the data stream where the bad window ended, never replaying
    it (PaLM-style); the offset keeps every earlier rollback's advance too. Returns the line to log."""
    bad_until, stream_position, elapsed = state.step, state.step + state.data_offset, state.elapsed_s
    ckpt.restore_snapshot(state, good_snapshot, restore_rng=False)
    state.data_offset, state.elapsed_s = stream_position - state.step, elapsed
    state.counters.reset_consecutive_()
    state.counters.start_interval_()
    clock.last_counters = state.counters.read()
    esc = state.escalation
    return (f"guard: {esc.reason} at step {bad_until}; rollback {esc.rollbacks}/{state.cfg.guard.max_rollbacks} "
            f"to step {state.step}, data stream continues at position {stream_position}")


def load_shard(cfg: TrainConfig, rank: int, world_size: int) -> tuple[int, PackedScenes]:
    """The dataset's scene count and this rank's scenes."""
    manifest = read_manifest(cfg.data.path)
    if manifest.num_scenes < world_size:
        raise DataError(f"dataset {cfg.data.path} has {manifest.num_scenes} scenes, fewer than the "
                        f"{world_size} workers: every worker needs at least one scene")
    return manifest.num_scenes, load_scenes(cfg.data.path, shard_scene_ids(manifest.num_scenes, rank, world_size))


@dataclass
class RunResult:
    """How a run ended, as ``worker.py`` writes it to ``summary.json``."""

    status: str  # finished | diverged | failed
    message: str
    steps: int
    epochs: float
    skipped_steps: int
    rollbacks: int
    restarts: int
    final_loss: float
    samples_per_s: float
    replica_checksums: list[str]
    elapsed_s: float

    @classmethod
    def of(cls, state: TrainState, status: str, message: str, checksums: list[str],
           last_metrics: dict[str, Any], clock: IntervalClock) -> RunResult:
        return cls(
            status=status, message=message or f"finished {state.total_steps} steps",
            steps=state.step, epochs=round(state.step / state.steps_per_epoch, 4),
            skipped_steps=state.counters.read()["skipped_steps"], rollbacks=state.escalation.rollbacks,
            restarts=state.restarts, final_loss=last_metrics.get("train/loss", math.inf),
            samples_per_s=clock.steady_samples_per_s or last_metrics.get("perf/samples_per_s", 0.0),
            replica_checksums=checksums, elapsed_s=round(state.elapsed_s, 3))

    def as_summary(self, cfg: TrainConfig) -> dict[str, Any]:
        return {**self.__dict__, "num_workers": cfg.scaling.num_workers, "use_gpu": cfg.scaling.use_gpu,
                "run_name": cfg.checkpoint.run_name}


def _silent(line: str) -> None:
    pass


def _no_phase(name: str) -> None:
    pass


def run_training(cfg: TrainConfig, coll: Collectives, device: torch.device, reporter: Reporter,
                 run_dir: str | Path, resume_from: dict[str, Any] | None = None, restarts: int = 0,
                 on_rank0_line: Callable[[str], None] = log.info,
                 on_phase: Callable[[str], None] = _no_phase) -> RunResult:
    """Train to ``optim.num_epochs`` (or divergence). Every rank calls this with the same config.

    ``restarts``: how many times the worker group was restarted before this attempt (for reporting).
    ``on_phase``: called with data_loaded, state_built, first_step_done, last_step_done (the start-up clock).
    """
    cfg = resolve_for_device(cfg, device)  # auto precision/compile (the worker has resolved them already)
    configure_precision(cfg)
    rank, world = coll.rank, coll.world_size
    say = on_rank0_line if rank == 0 else _silent
    num_scenes, packed = load_shard(cfg, rank, world)
    on_phase("data_loaded")
    state = build_state(cfg, coll, device, num_scenes)
    if resume_from is not None:
        ckpt.resume(state, resume_from)
    state.restarts = restarts
    schedule = state.schedule
    sampler = SceneSampler(packed, scenes_per_step=cfg.data.scenes_per_step // world,
                           samples_per_scene=cfg.data.samples_per_scene, steps_per_epoch=schedule.steps_per_epoch,
                           seed=cfg.data.seed, rank=rank, device=device)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard) if rank == 0 else None
    validator = Validator(cfg, coll, device) if cfg.validation.path else None
    # The rollback target: the last good snapshot (the start of the run until the first checkpoint).
    good_snapshot = resume_from if resume_from is not None else ckpt.take_snapshot(state)
    clock = IntervalClock(last_counters=state.counters.read())
    metrics: dict[str, Any] = {}
    status, message = "finished", ""
    say(start_line(state, resumed=resume_from is not None))
    on_phase("state_built")
    first_step = state.step
    epoch = -1
    while state.step < schedule.total_steps:
        step = state.step
        if schedule.epoch_of(step) != epoch:  # a new epoch, or another one after a rollback
            epoch = schedule.epoch_of(step)
            reg_weight = start_epoch(state, epoch)
        maybe_crash(cfg, step, rank, run_dir)
        scene_idx_B, xyz_N3, sdf_N = sampler.batch(step + state.data_offset)
        train_step(state, scene_idx_B, xyz_N3, sdf_N, reg_weight, injections_at(cfg, step, rank))
        state.step += 1
        if state.step == first_step + 1:
            on_phase("first_step_done")
        if state.step == schedule.total_steps:
            on_phase("last_step_done")
        if not schedule.report_due(state.step):
            continue

        metrics = collect_metrics(state, clock)
        decision = state.escalation.observe(state.step, metrics["guard/skipped_steps"],
                                            metrics["guard/longest_skip_streak"])
        snapshot = None
        if decision == "continue":
            if validator is not None and schedule.validation_due(state.step):
                val_metrics = validator.run(state.decoder_module, cfg.model.latent_size)
                clock.start_time += val_metrics["perf/val_seconds"]  # samples/s counts training time only
                metrics.update(val_metrics)
                say(validator.line(val_metrics))
            say(progress_line(state, metrics))
            if schedule.checkpoint_due(state.step):
                snapshot = ckpt.take_snapshot(state)
                if metrics["guard/consecutive_skips"] == 0:
                    good_snapshot = snapshot
        elif decision == "rollback":
            say(roll_back(state, good_snapshot, clock))
            metrics["guard/rollbacks"] = state.escalation.rollbacks
        else:
            status = "diverged"
            message = (f"run diverged at step {state.step}: {state.escalation.reason}, after "
                       f"{state.escalation.rollbacks} rollback(s) (guard.max_rollbacks={cfg.guard.max_rollbacks})")
            metrics["diverged"] = 1
            say(message)
        if writer is not None:
            writer.write(metrics)
        reporter(metrics, snapshot)
        if status == "diverged":
            break

    checksums = ckpt.replica_checksums(state)
    if writer is not None:
        writer.close()
    if len(set(checksums)) > 1:
        status = "failed"
        message = f"replicas diverged from each other: checksums {checksums} differ (a bug: please report it)"
    return RunResult.of(state, status, message, checksums, metrics, clock)
