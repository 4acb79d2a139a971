"""Device-resident scene sampler: the training hot path.

All of a rank's samples live on its device; :meth:`SceneSampler.batch` only launches kernels (no host <-> device
synchronisation, no file or CPU work), so it can run ahead of the GPU. Randomness comes from generators
re-seeded host-side from ``(seed, rank, stream_step)``: a batch depends on nothing else, so a resumed run
replays exactly the same batches.
"""

from __future__ import annotations

import torch

from sdf_ray.data.format import PackedScenes
from sdf_ray.errors import DataError

_MASK64 = (1 << 64) - 1
_TAG_PERM = 0x5045524D  # "PERM"
_TAG_POINTS = 0x50545300  # "PTS"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes, unlike ``hash``)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def shard_scene_ids(num_scenes: int, rank: int, world_size: int) -> list[int]:
    """Global scene ids owned by ``rank``: round robin, rank r owns r, r + W, r + 2W, ..."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, num_scenes, world_size))


class SceneSampler:
    """Draws ``scenes_per_step`` local scenes per step and ``samples_per_scene`` points from each.

    Scene order: each epoch is a fresh permutation of the local scenes seeded by ``(seed, rank, epoch)``;
    step ``i`` of the epoch takes the permutation's entries ``i*B .. i*B+B-1`` (wrapping around), so the
    batch shape is static even when ``B`` does not divide the number of scenes or exceeds it.
    Points: per scene, ``S/2`` rows drawn with replacement from its ``sdf > 0`` rows, then ``S/2`` from its
    ``sdf <= 0`` rows.
    """

    def __init__(self, packed: PackedScenes, *, scenes_per_step: int, samples_per_scene: int,
                 steps_per_epoch: int, seed: int, rank: int, device: torch.device) -> None:
        if scenes_per_step <= 0:
            raise DataError(f"scenes_per_step must be positive, got {scenes_per_step}")
        if samples_per_scene <= 0 or samples_per_scene % 2:
            raise DataError(f"samples_per_scene must be a positive even number, got {samples_per_scene}")
        if steps_per_epoch <= 0:
            raise DataError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if packed.num_scenes == 0:
            raise DataError(f"rank {rank} has no scenes to sample from (more ranks than scenes?)")
        if (packed.pos_count <= 0).any() or (packed.neg_count <= 0).any():
            raise DataError("every scene needs at least one sample with sdf > 0 and one with sdf <= 0")
        self.num_scenes = packed.num_scenes
        self.scenes_per_step = scenes_per_step
        self.samples_per_scene = samples_per_scene
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.device = torch.device(device)
        self.scene_ids = torch.as_tensor(packed.scene_ids, dtype=torch.int64).to(self.device)  # global ids
        self._samples_M4 = torch.from_numpy(packed.samples_M4).to(self.device, torch.float32)
        self._pos_offset = torch.as_tensor(packed.pos_offset, dtype=torch.int64).to(self.device)
        self._pos_count = torch.as_tensor(packed.pos_count, dtype=torch.int64).to(self.device)
        self._neg_offset = torch.as_tensor(packed.neg_offset, dtype=torch.int64).to(self.device)
        self._neg_count = torch.as_tensor(packed.neg_count, dtype=torch.int64).to(self.device)
        self._arange_B = torch.arange(scenes_per_step, dtype=torch.int64, device=self.device)
        self._perm_gen = torch.Generator(device=self.device)
        self._point_gen = torch.Generator(device=self.device)
        self._perm_epoch = -1
        self._perm = self._arange_B  # replaced on first use

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The local scene order of ``epoch`` (cached on the device for the current epoch)."""
        if epoch != self._perm_epoch:
            self._perm_gen.manual_seed(mix_seed(self.seed, self.rank, epoch, _TAG_PERM))
            self._perm = torch.randperm(self.num_scenes, generator=self._perm_gen, device=self.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, stream_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scene_idx_B int64 local indices 0..num_scenes-1, xyz_N3 float32, sdf_N float32), N = B * S.

        Rows ``b*S:(b+1)*S`` belong to scene ``scene_idx_B[b]``; the first ``S/2`` of them have sdf > 0, the
        rest sdf <= 0. Same ``(seed, rank, stream_step)`` gives a bitwise identical batch.
        """
        epoch, i = divmod(stream_step, self.steps_per_epoch)
        perm = self.epoch_permutation(epoch)
        start = (i * self.scenes_per_step) % self.num_scenes  # host ints: keeps the index math small
        scene_idx_B = perm[(self._arange_B + start) % self.num_scenes]
        half = self.samples_per_scene // 2
        B = self.scenes_per_step
        g = self._point_gen
        g.manual_seed(mix_seed(self.seed, self.rank, stream_step, _TAG_POINTS))
        # float64 uniforms so that floor(u * count) reaches every row even for scenes of > 2^24 rows.
        u_pos = torch.rand(B, half, generator=g, device=self.device, dtype=torch.float64)
        u_neg = torch.rand(B, half, generator=g, device=self.device, dtype=torch.float64)
        pos_count = self._pos_count[scene_idx_B].unsqueeze(1)
        neg_count = self._neg_count[scene_idx_B].unsqueeze(1)
        # u < 1 but u * count may round up to count: clamp to the last row.
        pos_rows = torch.minimum((u_pos * pos_count).long(), pos_count - 1) + self._pos_offset[scene_idx_B].unsqueeze(1)
        neg_rows = torch.minimum((u_neg * neg_count).long(), neg_count - 1) + self._neg_offset[scene_idx_B].unsqueeze(1)
        rows_N = torch.cat([pos_rows, neg_rows], dim=1).reshape(-1)
        samples_N4 = torch.index_select(self._samples_M4, 0, rows_N)
        xyz_N3 = samples_N4[:, :3].contiguous()
        sdf_N = samples_N4[:, 3].contiguous()
        return scene_idx_B, xyz_N3, sdf_N

    def global_scene_ids(self, scene_idx_B: torch.Tensor) -> torch.Tensor:
        """Map local indices (as returned by :meth:`batch`) to global scene ids."""
        return self.scene_ids[scene_idx_B]
