"""Entry points for multi-process tests (spawned; must be importable)."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as dist

from sdf_ray import checkpoint as ckpt
from sdf_ray.config import InjectConfig
from sdf_ray.dist import LocalCollectives, TorchCollectives
from sdf_ray.train_loop import train_step
from sdf_ray.train_state import build_state
from tests.helpers import tiny_config

NUM_SCENES = 4


def collectives(rank: int, world: int, port: int) -> Any:
    """A gloo process group on 127.0.0.1 for world > 1, else the single-process stub."""
    if world == 1:
        return LocalCollectives()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return TorchCollectives()


def global_batch(step: int, samples_per_scene: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points for every scene (scene-major), the same whoever asks."""
    g = torch.Generator().manual_seed(100 + step)
    xyz = torch.rand(NUM_SCENES, samples_per_scene, 3, generator=g) * 2 - 1
    radius = 0.3 + 0.1 * torch.arange(NUM_SCENES).view(-1, 1)
    sdf = xyz.norm(dim=2) - radius
    return xyz, sdf


def run_steps(rank: int, world: int, port: int, out_path: str, num_steps: int,
              injections: list[dict[str, Any]], overrides: dict[str, Any]) -> None:
    coll = collectives(rank, world, port)
    torch.set_num_threads(1)
    if overrides.get("model.compile"):
        # aot_eager captures graphs as inductor does (dynamo, DDP's bucketed graph splits, AOT autograd,
        # the compiled dropout branch) without a C++ toolchain or minutes of codegen on CPU.
        torch.compile = functools.partial(torch.compile, backend="aot_eager")  # type: ignore[assignment]
    cfg = tiny_config(**{"scaling.num_workers": world, "data.scenes_per_step": NUM_SCENES, **overrides})
    state = build_state(cfg, coll, torch.device("cpu"), NUM_SCENES)
    s = cfg.data.samples_per_scene
    skipped = []
    for step in range(num_steps):
        xyz, sdf = global_batch(step, s)
        mine = state.shard  # global ids this rank owns, in local order
        scene_idx = torch.arange(len(mine))
        injs = [InjectConfig(**i) for i in injections if i["step"] == step and i["rank"] == rank]
        verdict, _, _ = train_step(state, scene_idx, xyz[mine].reshape(-1, 3), sdf[mine].reshape(-1),
                                   reg_weight=1e-3, injections=injs)
        state.step += 1
        if bool(verdict.bad):
            skipped.append(step)
    snap = ckpt.take_snapshot(state)
    result = {
        "rank": rank,
        "skipped": skipped,
        "counters": state.counters.read(),
        "checksum": ckpt.replica_checksum(state, snap),
        "decoder": snap["decoder"],
        "latents": snap["latents"],
    }
    torch.save(result, out_path)
    if world > 1:
        dist.barrier()  # leave together: gloo aborts a process whose peer tears down mid-communication
        dist.destroy_process_group()


def reshard(rank: int, world: int, port: int, snap_path: str, out_path: str, train_steps: int) -> None:
    """Train ``train_steps`` steps and save a snapshot, or (train_steps == 0) restore one and re-snapshot it."""
    coll = collectives(rank, world, port)
    num_scenes = 7  # shards of unequal length on 2 and 3 ranks
    cfg = tiny_config(**{"scaling.num_workers": 1})
    state = build_state(cfg, coll, torch.device("cpu"), num_scenes)
    if train_steps:
        s = cfg.data.samples_per_scene
        for step in range(train_steps):
            g = torch.Generator().manual_seed(step)
            xyz = torch.rand(len(state.shard) * s, 3, generator=g) * 2 - 1
            train_step(state, torch.arange(len(state.shard)), xyz, xyz.norm(dim=1) - 0.5, reg_weight=1e-3)
            state.step += 1
        snap = ckpt.take_snapshot(state)
    else:
        ckpt.restore_snapshot(state, torch.load(snap_path, weights_only=False))
        snap = ckpt.take_snapshot(state)
    if rank == 0:
        torch.save(snap, out_path)
    if world > 1:
        dist.barrier()  # leave together: gloo aborts a process whose peer tears down mid-communication
        dist.destroy_process_group()
