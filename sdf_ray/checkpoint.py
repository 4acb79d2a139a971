"""Training state <-> a world-size-independent snapshot (gathered codes), on disk and in memory.

A snapshot holds the decoder, its Adam moments, the full latent table and its Adam moments in
global scene order, counters, the data-stream position and RNG states. Taking one is a collective
(every rank gathers every rank's codes), so every rank ends up with the same snapshot: that is what
lets any rank roll back, and a restart with another world size re-shard it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from sdf_ray.data.sampler import shard_scene_ids
from sdf_ray.errors import DataError
from sdf_ray.fsutil import atomic_file
from sdf_ray.train_state import TrainState, seed_dropout_rng

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def take_snapshot(state: TrainState) -> dict[str, Any]:
    """Collective: call on every rank at the same step. Returns CPU tensors only."""
    coll = state.coll
    world, num_scenes = coll.world_size, state.num_scenes_total
    latent_param = state.latents.codes
    latent_opt = state.optimizer.state[latent_param]

    def gather_table(local_NL: torch.Tensor) -> torch.Tensor:
        full = torch.empty((num_scenes, local_NL.shape[1]), dtype=local_NL.dtype)
        for rank, rows in enumerate(coll.all_gather_rows(local_NL.detach())):
            full[shard_scene_ids(num_scenes, rank, world)] = rows.cpu()
        return full

    decoder_params = list(state.decoder_module.parameters())
    rng = {"cpu": torch.get_rng_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    return {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "data_offset": state.data_offset,
        "rollbacks": state.escalation.rollbacks,
        "guard_counters": state.counters.state(),
        "elapsed_s": state.elapsed_s,
        "decoder": {k: _cpu(v) for k, v in state.decoder_module.state_dict().items()},
        "decoder_optim": [
            {k: _cpu(v) for k, v in state.optimizer.state[p].items()} for p in decoder_params
        ],
        "latents": gather_table(latent_param),
        "latent_optim": {
            "exp_avg": gather_table(latent_opt["exp_avg"]),
            "exp_avg_sq": gather_table(latent_opt["exp_avg_sq"]),
            "step": _cpu(latent_opt["step"]),
        },
        "rng": coll.all_gather_object(rng),
        "world_size": world,
    }


@torch.no_grad()
def restore_snapshot(state: TrainState, snap: dict[str, Any], *, restore_rng: bool = True) -> None:
    """Load a snapshot into this rank's state in place (optimizer references stay valid)."""
    if snap.get("format_version") != FORMAT_VERSION:
        raise DataError(f"checkpoint format {snap.get('format_version')!r}, expected {FORMAT_VERSION}")
    if snap["latents"].shape[0] != state.num_scenes_total:
        raise DataError(f"the run's checkpoint has {snap['latents'].shape[0]} latent codes but the dataset has "
                        f"{state.num_scenes_total} scenes: the dataset changed; use a new run name or --overwrite")
    state.decoder_module.load_state_dict(snap["decoder"])
    for p, saved in zip(state.decoder_module.parameters(), snap["decoder_optim"]):
        for k, v in saved.items():
            state.optimizer.state[p][k].copy_(v)
    shard = torch.as_tensor(state.shard)
    state.latents.codes.copy_(snap["latents"][shard])
    latent_opt = state.optimizer.state[state.latents.codes]
    latent_opt["exp_avg"].copy_(snap["latent_optim"]["exp_avg"][shard])
    latent_opt["exp_avg_sq"].copy_(snap["latent_optim"]["exp_avg_sq"][shard])
    latent_opt["step"].copy_(snap["latent_optim"]["step"])
    state.step = int(snap["step"])
    state.data_offset = int(snap["data_offset"])
    state.elapsed_s = float(snap.get("elapsed_s", 0.0))
    if restore_rng and snap["world_size"] == state.coll.world_size:
        rng = snap["rng"][state.coll.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and state.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], state.device)
    elif restore_rng:  # another world size: fresh, deterministic per-rank dropout streams
        seed_dropout_rng(state.cfg.data.seed, state.coll.rank, state.step)


def resume(state: TrainState, snap: dict[str, Any]) -> None:
    """Continue a run from its snapshot: :func:`restore_snapshot` plus the guard's history (rollbacks and
    counters), which a rollback keeps but a restart must bring back."""
    restore_snapshot(state, snap)
    state.escalation.rollbacks = int(snap["rollbacks"])
    state.counters.load(snap["guard_counters"])


def replica_checksum(state: TrainState, snap: dict[str, Any]) -> str:
    """Hash of this rank's replicated state: decoder, its Adam moments and steps, the latent Adam step,
    the guard counters, step and data position, plus the gathered codes and their moments.

    Equal checksums across ranks prove the replicas never drifted apart.
    """
    h = hashlib.sha256()
    # Host and device state that a broken vote would let drift: step counts, counters, data position.
    latent_step = state.optimizer.state[state.latents.codes]["step"]
    h.update(repr((state.step, state.data_offset, state.escalation.rollbacks, state.counters.state(),
                   float(latent_step))).encode())
    for p in state.decoder_module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
        for v in state.optimizer.state[p].values():
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for t in (snap["latents"], snap["latent_optim"]["exp_avg"], snap["latent_optim"]["exp_avg_sq"]):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def replica_checksums(state: TrainState) -> list[str]:
    """Collective: every rank's :func:`replica_checksum`, in rank order (all equal unless replicas drifted)."""
    return state.coll.all_gather_object(replica_checksum(state, take_snapshot(state)))


def save(snap: dict[str, Any], directory: str | Path) -> Path:
    """Write atomically (temp file + rename) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_FILE
    with atomic_file(final) as tmp:
        torch.save(snap, tmp)
    return final


def load(directory: str | Path) -> dict[str, Any]:
    snap: dict[str, Any] = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    return snap
