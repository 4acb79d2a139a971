"""``train_step()`` and the training loop: plain functions, readable top to bottom, Ray-free.

The loop runs the same on 1 process (``LocalCollectives``) and on N ranks (``TorchCollectives``): every
rank executes the same collectives at the same steps, and every decision that changes control flow
(log, checkpoint, roll back, stop) is taken from step numbers or from voted values, never from
rank-local data. ``worker.py`` adapts it to Ray Train.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sdf_ray import checkpoint as ckpt
from sdf_ray.config import InjectConfig, TrainConfig
from sdf_ray.data.format import PackedScenes, load_scenes, read_manifest
from sdf_ray.data.sampler import SceneSampler, shard_scene_ids
from sdf_ray.dist import Collectives
from sdf_ray.errors import DataError
from sdf_ray.guard import (
    COUNTER_NAMES,
    Escalation,
    GuardCounters,
    StepVerdict,
    conditional_step,
    materialise_adam_state,
    vote_and_clip,
)
from sdf_ray.latents import LatentTable, init_latents
from sdf_ray.loss import code_reg_weight, sdf_loss
from sdf_ray.metrics_log import MetricsWriter, finite_or_inf
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.schedules import group_lrs

log = logging.getLogger("sdf_ray")

CRASH_MARKER = ".crash-injected"


class Reporter(Protocol):
    """Where metrics (every logging interval) and checkpoints go. Called on every rank, same count."""

    def __call__(self, metrics: dict[str, Any], snapshot: dict[str, Any] | None) -> None: ...


@dataclass
class TrainState:
    cfg: TrainConfig
    coll: Collectives
    device: torch.device
    decoder: nn.Module  # what forward runs: DDP-wrapped and/or compiled
    decoder_module: DeepSDFDecoder  # the plain module (state dicts, parameters)
    latents: LatentTable
    optimizer: torch.optim.Optimizer
    counters: GuardCounters
    escalation: Escalation
    shard: list[int]
    num_scenes_total: int
    steps_per_epoch: int
    step: int = 0
    data_offset: int = 0
    restarts: int = 0
    elapsed_s: float = 0.0
    metric_acc: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    @property
    def total_steps(self) -> int:
        return self.cfg.optim.num_epochs * self.steps_per_epoch

    @property
    def decoder_params(self) -> list[nn.Parameter]:
        return list(self.decoder_module.parameters())


def steps_per_epoch(num_scenes: int, scenes_per_step: int) -> int:
    return max(1, math.ceil(num_scenes / scenes_per_step))


def build_state(cfg: TrainConfig, coll: Collectives, device: torch.device, num_scenes_total: int) -> TrainState:
    """Decoder, this rank's latent shard and the optimizer, identically initialised on every rank."""
    seed = cfg.data.seed
    torch.manual_seed(seed)  # same decoder init on every rank (DDP would broadcast rank 0's anyway)
    decoder_module = DeepSDFDecoder(cfg.model).to(device)
    # Codes are drawn for the whole dataset, then sharded: a run's init is independent of world size.
    codes = init_latents(num_scenes_total, cfg.model.latent_size, torch.Generator().manual_seed(seed + 1))
    shard = shard_scene_ids(num_scenes_total, coll.rank, coll.world_size)
    latents = LatentTable(codes[torch.as_tensor(shard)]).to(device)
    decoder: nn.Module = decoder_module
    if coll.world_size > 1:
        # DDP all-reduces (averages) decoder gradients inside backward; latents stay out of it.
        decoder = nn.parallel.DistributedDataParallel(
            decoder_module, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    if cfg.model.compile:
        avoid_inductor_mix_order_reduction()
        decoder = torch.compile(decoder, mode=cfg.model.compile_mode)  # type: ignore[assignment]
    lrs = group_lrs(cfg.optim, 0)
    optimizer = torch.optim.Adam(
        [{"params": decoder_module.parameters(), "lr": lrs["decoder"], "name": "decoder"},
         {"params": latents.parameters(), "lr": lrs["latents"], "name": "latents"}],
        betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)
    materialise_adam_state(optimizer)
    ckpt.seed_dropout_rng(seed, coll.rank, 0)
    return TrainState(
        cfg=cfg, coll=coll, device=device, decoder=decoder, decoder_module=decoder_module, latents=latents,
        optimizer=optimizer, counters=GuardCounters(device), escalation=Escalation(cfg.guard), shard=shard,
        num_scenes_total=num_scenes_total,
        steps_per_epoch=steps_per_epoch(num_scenes_total, cfg.data.scenes_per_step),
        metric_acc=torch.zeros(3, dtype=torch.float64, device=device))


def avoid_inductor_mix_order_reduction() -> None:
    """Turn off inductor's mix-order reduction fusion (process-wide: inductor has no per-model switch)
    unless TORCHINDUCTOR_MIX_ORDER_REDUCTION says otherwise.

    In torch 2.11 it fails to compile this decoder's backward at some batch shapes (16 scenes x 4,096
    samples: ``AssertionError: 512 v.s. 8192`` in ``MixOrderReduction.get_numel_rnumel``): the per-code
    (sum over samples) and per-feature (sum over everything) gradient reductions meet in one fusion.
    """
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_MIX_ORDER_REDUCTION" not in os.environ and hasattr(inductor_config.triton,
                                                                        "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


def precision_context(cfg: TrainConfig, device: torch.device) -> Any:
    if cfg.optim.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def configure_precision(cfg: TrainConfig) -> None:
    tf32 = cfg.optim.precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


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


def set_epoch_lrs(state: TrainState, epoch: int) -> None:
    lrs = group_lrs(state.cfg.optim, epoch)
    for group in state.optimizer.param_groups:
        group["lr"] = lrs[group["name"]]


def injections_at(cfg: TrainConfig, step: int, rank: int) -> list[InjectConfig]:
    return [inj for inj in cfg.debug.inject
            if inj.rank == rank and (inj.step == step or (inj.repeat and step > inj.step))]


@dataclass
class IntervalClock:
    """Host-side timing between logging syncs (the sync drains the device, so the times are real)."""

    last_counters: dict[str, int]
    start_time: float = field(default_factory=time.perf_counter)
    steady_samples: float = 0.0
    steady_time: float = 0.0
    intervals: int = 0

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / self.steady_time if self.steady_time > 0 else 0.0


def collect_metrics(state: TrainState, clock: IntervalClock) -> dict[str, Any]:
    """One all-reduce and one host sync per logging interval."""
    coll = state.coll
    acc = state.metric_acc.clone()
    coll.all_reduce_sum_(acc)
    values = torch.cat([acc, state.counters.values.double()]).tolist()  # the interval's one host sync
    state.metric_acc.zero_()
    now = time.perf_counter()
    loss_sum, l1_sum, norm_sum = values[:3]
    counters = dict(zip(COUNTER_NAMES, map(int, values[3:])))
    state.counters.start_interval_()
    steps = counters["steps"] - clock.last_counters["steps"]
    skipped = counters["skipped_steps"] - clock.last_counters["skipped_steps"]
    good = steps - skipped
    elapsed = max(now - clock.start_time, 1e-9)
    samples = steps * state.cfg.data.scenes_per_step * state.cfg.data.samples_per_scene
    if clock.intervals > 0:  # the first interval carries warm-up (allocations, compilation)
        clock.steady_samples += samples
        clock.steady_time += elapsed
    clock.intervals += 1
    clock.start_time, clock.last_counters = now, counters
    state.elapsed_s += elapsed
    denominator = coll.world_size * good
    lrs = {g["name"]: g["lr"] for g in state.optimizer.param_groups}
    return {
        "train/loss": finite_or_inf(loss_sum / denominator) if good else math.inf,
        "train/l1": finite_or_inf(l1_sum / denominator) if good else math.inf,
        "train/grad_norm": finite_or_inf(norm_sum / denominator) if good else math.inf,
        "train/epoch": round(state.step / state.steps_per_epoch, 4),
        "train/step": state.step,
        "train/lr_decoder": lrs["decoder"],
        "train/lr_latents": lrs["latents"],
        "guard/skipped_steps": counters["skipped_steps"],
        "guard/interval_skipped_steps": skipped,
        "guard/skip_fraction": skipped / steps if steps else 0.0,
        "guard/consecutive_skips": counters["consecutive_skips"],
        "guard/longest_skip_streak": counters["longest_skip_streak"],
        "guard/clipped_steps": counters["clipped_steps"],
        "guard/rollbacks": state.escalation.rollbacks,
        "perf/samples_per_s": samples / elapsed,
        "perf/step_time_ms": 1000 * elapsed / steps if steps else 0.0,
        "restarts": state.restarts,
        "diverged": 0,
    }


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(state: TrainState, metrics: dict[str, Any]) -> str:
    epoch = state.step // state.steps_per_epoch
    remaining = state.total_steps - state.step
    eta = remaining * metrics["perf/step_time_ms"] / 1000
    return (f"epoch {epoch}/{state.cfg.optim.num_epochs}  step {state.step}/{state.total_steps}  "
            f"loss {metrics['train/loss']:.5f}  |g| {metrics['train/grad_norm']:.3g}  "
            f"{metrics['perf/samples_per_s'] / 1e6:.2f}M samples/s  "
            f"skipped {metrics['guard/skipped_steps']}  rollbacks {metrics['guard/rollbacks']}  "
            f"ETA {_fmt_duration(eta)}")


def load_shard(cfg: TrainConfig, rank: int, world_size: int) -> tuple[int, PackedScenes]:
    manifest = read_manifest(cfg.data.path)
    if manifest.num_scenes < world_size:
        raise DataError(f"dataset {cfg.data.path} has {manifest.num_scenes} scenes, fewer than the "
                        f"{world_size} workers: every worker needs at least one scene")
    return manifest.num_scenes, load_scenes(cfg.data.path, shard_scene_ids(manifest.num_scenes, rank, world_size))


@dataclass
class RunResult:
    status: str  # finished | diverged
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

    def as_summary(self, cfg: TrainConfig) -> dict[str, Any]:
        return {**self.__dict__, "num_workers": cfg.scaling.num_workers, "use_gpu": cfg.scaling.use_gpu,
                "run_name": cfg.checkpoint.run_name}


def run_training(cfg: TrainConfig, coll: Collectives, device: torch.device, reporter: Reporter,
                 run_dir: str | Path, resume_from: dict[str, Any] | None = None, restarts: int = 0,
                 on_rank0_line: Callable[[str], None] = log.info) -> RunResult:
    """Train to ``optim.num_epochs`` (or divergence). Every rank calls this with the same config.

    ``restarts``: how many times the worker group was restarted before this attempt (for reporting).
    """
    configure_precision(cfg)
    rank, world = coll.rank, coll.world_size
    num_scenes, packed = load_shard(cfg, rank, world)
    state = build_state(cfg, coll, device, num_scenes)
    if resume_from is not None:
        ckpt.restore_snapshot(state, resume_from)
        state.escalation.rollbacks = int(resume_from["rollbacks"])
        state.counters.load(resume_from["guard_counters"])
    state.restarts = restarts
    sampler = SceneSampler(packed, scenes_per_step=cfg.data.scenes_per_step // world,
                           samples_per_scene=cfg.data.samples_per_scene, steps_per_epoch=state.steps_per_epoch,
                           seed=cfg.data.seed, rank=rank, device=device)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard) if rank == 0 else None
    # The rollback target: the last good snapshot (the start of the run until the first checkpoint).
    good_snapshot = resume_from if resume_from is not None else ckpt.take_snapshot(state)
    clock = IntervalClock(last_counters=state.counters.read())
    every_log, every_ckpt = cfg.logging.every_n_steps, cfg.checkpoint.every_n_epochs
    metrics: dict[str, Any] = {}
    status, message = "finished", ""
    if rank == 0:
        on_rank0_line(f"training {num_scenes} scenes on {world} worker(s) ({device.type}): "
                      f"{state.steps_per_epoch} steps/epoch, {state.total_steps} steps, "
                      f"{cfg.data.scenes_per_step * cfg.data.samples_per_scene:,} samples/step"
                      + (f", resuming at step {state.step}" if resume_from is not None else ""))
    epoch = -1
    while state.step < state.total_steps:
        step = state.step
        if step // state.steps_per_epoch != epoch:
            epoch = step // state.steps_per_epoch
            set_epoch_lrs(state, epoch)
            reg_weight = code_reg_weight(cfg.loss, epoch)
        crash = cfg.debug.crash
        if crash is not None and crash.step == step and crash.rank == rank:
            marker = Path(run_dir) / CRASH_MARKER
            if not marker.exists():
                marker.write_text(f"worker rank {rank} crashed on purpose at step {step}\n")
                log.error("debug.crash: rank %d exits abruptly at step %d", rank, step)
                os._exit(1)
        scene_idx_B, xyz_N3, sdf_N = sampler.batch(step + state.data_offset)
        train_step(state, scene_idx_B, xyz_N3, sdf_N, reg_weight, injections_at(cfg, step, rank))
        state.step += 1

        end_of_epoch = state.step % state.steps_per_epoch == 0 or state.step == state.total_steps
        epochs_done = math.ceil(state.step / state.steps_per_epoch)
        checkpoint_due = end_of_epoch and (epochs_done % every_ckpt == 0 or state.step == state.total_steps)
        if state.step % every_log and not checkpoint_due:
            continue
        metrics = collect_metrics(state, clock)
        decision = state.escalation.observe(state.step, metrics["guard/skipped_steps"],
                                            metrics["guard/longest_skip_streak"])
        if decision == "rollback":
            bad_until, stream_position, elapsed = state.step, state.step + state.data_offset, state.elapsed_s
            ckpt.restore_snapshot(state, good_snapshot, restore_rng=False)
            # Resume the data stream where the bad window ended, never replaying it (PaLM-style): the
            # offset keeps every earlier rollback's advance too.
            state.data_offset, state.elapsed_s = stream_position - state.step, elapsed
            state.counters.values[1] = 0
            state.counters.start_interval_()
            clock.last_counters = state.counters.read()
            epoch = -1
            metrics["guard/rollbacks"] = state.escalation.rollbacks
            if rank == 0:
                on_rank0_line(f"guard: {state.escalation.reason} at step {bad_until}; rollback "
                              f"{state.escalation.rollbacks}/{cfg.guard.max_rollbacks} to step {state.step}, "
                              f"data stream continues at position {stream_position}")
        elif decision == "diverged":
            status = "diverged"
            message = (f"run diverged at step {state.step}: {state.escalation.reason}, after "
                       f"{state.escalation.rollbacks} rollback(s) (guard.max_rollbacks={cfg.guard.max_rollbacks})")
            metrics["diverged"] = 1
            if rank == 0:
                on_rank0_line(message)
        elif rank == 0:
            on_rank0_line(progress_line(state, metrics))
        snapshot = None
        if checkpoint_due and decision == "continue":
            snapshot = ckpt.take_snapshot(state)
            if metrics["guard/consecutive_skips"] == 0:
                good_snapshot = snapshot
        if writer is not None:
            writer.write(metrics)
        reporter(metrics, snapshot)
        if status == "diverged":
            break

    final_snapshot = ckpt.take_snapshot(state)
    checksums = coll.all_gather_object(ckpt.replica_checksum(state, final_snapshot))
    if writer is not None:
        writer.close()
    counters = state.counters.read()
    if len(set(checksums)) > 1:
        status = "failed"
        message = f"replicas diverged from each other: checksums {checksums} differ (a bug: please report it)"
    return RunResult(
        status=status, message=message or f"finished {state.total_steps} steps",
        steps=state.step, epochs=round(state.step / state.steps_per_epoch, 4),
        skipped_steps=counters["skipped_steps"], rollbacks=state.escalation.rollbacks, restarts=state.restarts,
        final_loss=metrics.get("train/loss", math.inf), samples_per_s=clock.steady_samples_per_s or
        metrics.get("perf/samples_per_s", 0.0), replica_checksums=checksums, elapsed_s=round(state.elapsed_s, 3))
