"""A run's training state (decoder, this rank's codes, optimizer, guard, step schedule) and how it is built.

``build_state`` initialises the state identically on every rank; the precision helpers and the per-rank
dropout seeding live here because building (and restoring) a state is what sets them up.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdf_ray.config import TrainConfig
from sdf_ray.data.sampler import mix_seed, shard_scene_ids
from sdf_ray.device_settings import compile_module, resolve_compile_cacheable, resolve_for_device
from sdf_ray.dist import Collectives
from sdf_ray.guard import Escalation, GuardCounters, materialise_adam_state
from sdf_ray.latents import LatentTable, init_latents
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.run_schedule import RunSchedule
from sdf_ray.schedules import group_lrs

DROPOUT_STREAM = 0xD0  # keeps dropout seeds apart from the sampler's, which mix the same (seed, rank, step)


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
    schedule: RunSchedule
    step: int = 0
    data_offset: int = 0
    restarts: int = 0
    elapsed_s: float = 0.0
    metric_acc: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def decoder_params(self) -> list[nn.Parameter]:
        return list(self.decoder_module.parameters())


def build_state(cfg: TrainConfig, coll: Collectives, device: torch.device, num_scenes_total: int) -> TrainState:
    """Decoder, this rank's latent shard and the optimizer, identically initialised on every rank."""
    cfg = resolve_for_device(cfg, device)  # auto precision/compile: concrete for this device
    schedule = RunSchedule.of(cfg, num_scenes_total)
    samples = schedule.total_steps * cfg.data.scenes_per_step * cfg.data.samples_per_scene
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, compile_cacheable=resolve_compile_cacheable(cfg.model.compile_cacheable, samples)))
    seed = cfg.data.seed
    torch.manual_seed(seed)  # same decoder init on every rank (DDP would broadcast rank 0's anyway)
    decoder_module = DeepSDFDecoder(cfg.model).to(device)
    decoder_module.cacheable_graph = bool(cfg.model.compile_cacheable)
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
        decoder = compile_module(decoder, cfg.model.compile_mode)
    lrs = group_lrs(cfg.optim, 0)
    optimizer = torch.optim.Adam(
        [{"params": decoder_module.parameters(), "lr": lrs["decoder"], "name": "decoder"},
         {"params": latents.parameters(), "lr": lrs["latents"], "name": "latents"}],
        betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)
    materialise_adam_state(optimizer)
    seed_dropout_rng(seed, coll.rank, 0)
    return TrainState(
        cfg=cfg, coll=coll, device=device, decoder=decoder, decoder_module=decoder_module, latents=latents,
        optimizer=optimizer, counters=GuardCounters(device), escalation=Escalation(cfg.guard), shard=shard,
        num_scenes_total=num_scenes_total, schedule=schedule,
        metric_acc=torch.zeros(3, dtype=torch.float64, device=device))


def seed_dropout_rng(seed: int, rank: int, step: int) -> None:
    """Each rank's dropout stream (torch's global RNG), a function of (seed, rank, step)."""
    torch.manual_seed(mix_seed(seed, rank, step, DROPOUT_STREAM))


def precision_context(cfg: TrainConfig, device: torch.device) -> Any:
    """The forward pass's autocast context (bf16), or a no-op."""
    if cfg.optim.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def configure_precision(cfg: TrainConfig) -> None:
    """Process-wide matmul precision: TF32 for ``tf32`` and ``bf16`` runs."""
    tf32 = cfg.optim.precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
