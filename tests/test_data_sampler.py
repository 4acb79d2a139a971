"""Device-resident sampler: shapes, scene order, sign halves, determinism and the absence of host syncs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdf_ray.data.format import PackedScenes
from sdf_ray.data.sampler import SceneSampler, shard_scene_ids
from sdf_ray.errors import DataError

CPU = torch.device("cpu")


def make_packed(counts: list[tuple[int, int]], ids: list[int] | None = None) -> PackedScenes:
    """Scene j's rows carry x = j, y = row index within its half, z = 0/1 for pos/neg, sdf = +-(y + 1)."""
    parts, pos_off, neg_off = [np.zeros((0, 4))], [], []
    offset = 0
    for j, (p, n) in enumerate(counts):
        pos = np.stack([np.full(p, j), np.arange(p), np.zeros(p), np.arange(p) + 1.0], 1)
        neg = np.stack([np.full(n, j), np.arange(n), np.ones(n), -np.arange(n) * 1.0], 1)
        parts += [pos, neg]
        pos_off.append(offset)
        neg_off.append(offset + p)
        offset += p + n
    return PackedScenes(
        samples_M4=np.concatenate(parts).astype(np.float32),
        pos_offset=np.array(pos_off, np.int64), pos_count=np.array([p for p, _ in counts], np.int64),
        neg_offset=np.array(neg_off, np.int64), neg_count=np.array([n for _, n in counts], np.int64),
        scene_ids=np.array(ids if ids is not None else range(len(counts)), np.int64),
    )


COUNTS = [(5, 3), (1, 1), (40, 60), (7, 2), (3, 9)]


def make_sampler(packed: PackedScenes | None = None, **kw: int) -> SceneSampler:
    args = {"scenes_per_step": 2, "samples_per_scene": 16, "steps_per_epoch": 3, "seed": 0, "rank": 0}
    args.update(kw)
    return SceneSampler(packed or make_packed(COUNTS), device=CPU, **args)


def check_batch(packed: PackedScenes, scene_idx: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor, S: int) -> None:
    B = scene_idx.shape[0]
    assert scene_idx.dtype == torch.int64 and xyz.dtype == torch.float32 and sdf.dtype == torch.float32
    assert xyz.shape == (B * S, 3) and sdf.shape == (B * S,)
    assert xyz.is_contiguous() and sdf.is_contiguous()
    assert ((scene_idx >= 0) & (scene_idx < packed.num_scenes)).all()
    owner = scene_idx.repeat_interleave(S).to(torch.float32)
    assert torch.equal(xyz[:, 0], owner)  # every row comes from its group's scene
    halves = sdf.view(B, S)
    assert (halves[:, : S // 2] > 0).all() and (halves[:, S // 2:] <= 0).all()
    z = xyz[:, 2].view(B, S)
    assert (z[:, : S // 2] == 0).all() and (z[:, S // 2:] == 1).all()
    # Rows stay inside the scene's own pos/neg block.
    row = xyz[:, 1].view(B, S).to(torch.int64)
    pos_count = torch.from_numpy(packed.pos_count)[scene_idx].unsqueeze(1)
    neg_count = torch.from_numpy(packed.neg_count)[scene_idx].unsqueeze(1)
    assert (row[:, : S // 2] < pos_count).all() and (row[:, S // 2:] < neg_count).all()


def test_shapes_signs_and_membership() -> None:
    packed = make_packed(COUNTS)
    sampler = make_sampler(packed)
    assert sampler.num_scenes == 5
    for step in range(12):
        check_batch(packed, *sampler.batch(step), S=16)


def test_draws_cover_rows_with_replacement() -> None:
    packed = make_packed([(3, 4)])
    sampler = make_sampler(packed, scenes_per_step=1, samples_per_scene=400, steps_per_epoch=1)
    _, xyz, sdf = sampler.batch(0)
    assert set(xyz[:200, 1].tolist()) == {0.0, 1.0, 2.0}
    assert set(xyz[200:, 1].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert set(sdf[200:].tolist()) == {0.0, -1.0, -2.0, -3.0}


def test_static_shape_when_batch_exceeds_scenes() -> None:
    packed = make_packed(COUNTS[:3])
    sampler = make_sampler(packed, scenes_per_step=7, samples_per_scene=4, steps_per_epoch=2)
    for step in range(6):
        scene_idx, xyz, sdf = sampler.batch(step)
        assert scene_idx.shape == (7,)
        assert set(scene_idx.tolist()) == {0, 1, 2}  # every scene, wrapping around the permutation
        check_batch(packed, scene_idx, xyz, sdf, S=4)


@pytest.mark.parametrize("num_scenes, B", [(12, 4), (10, 4), (5, 2)])
def test_epoch_visits_every_scene(num_scenes: int, B: int) -> None:
    packed = make_packed([(2, 2)] * num_scenes)
    steps = math.ceil(num_scenes / B)
    sampler = make_sampler(packed, scenes_per_step=B, samples_per_scene=2, steps_per_epoch=steps)
    for epoch in range(3):
        seen = torch.cat([sampler.batch(epoch * steps + i)[0] for i in range(steps)]).tolist()
        assert set(seen) == set(range(num_scenes))
        if num_scenes % B == 0:
            assert sorted(seen) == list(range(num_scenes))  # exactly once
    orders = [sampler.epoch_permutation(e).tolist() for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def test_determinism_and_seed_rank_dependence() -> None:
    a, b = make_sampler(), make_sampler()
    for step in (0, 1, 7, 3, 100):
        for x, y in zip(a.batch(step), b.batch(step), strict=True):
            assert torch.equal(x, y)
    # Stateless: a step's batch does not depend on which steps were drawn before.
    fresh = make_sampler()
    ref = fresh.batch(7)
    for x, y in zip(ref, a.batch(7), strict=True):
        assert torch.equal(x, y)
    for other in (make_sampler(seed=1), make_sampler(rank=1)):
        assert not torch.equal(other.batch(7)[1], ref[1])
    assert not torch.equal(a.batch(8)[1], ref[1])


def test_global_scene_ids() -> None:
    packed = make_packed(COUNTS, ids=[3, 7, 11, 15, 19])
    sampler = make_sampler(packed)
    scene_idx, _, _ = sampler.batch(0)
    assert sampler.global_scene_ids(scene_idx).tolist() == [[3, 7, 11, 15, 19][i] for i in scene_idx.tolist()]


def test_batch_never_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = make_sampler(scenes_per_step=3, steps_per_epoch=2)
    expected = [sampler.batch(s) for s in range(6)]
    sampler = make_sampler(scenes_per_step=3, steps_per_epoch=2)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host sync in SceneSampler.batch")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "nonzero", "__index__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    monkeypatch.setattr(torch, "unique", forbidden)
    monkeypatch.setattr(torch, "masked_select", forbidden)
    got = [sampler.batch(s) for s in range(6)]  # crosses epoch boundaries: permutation recomputed too
    monkeypatch.undo()
    for g, e in zip(got, expected, strict=True):
        for x, y in zip(g, e, strict=True):
            assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_never_syncs_on_cuda() -> None:
    packed = make_packed(COUNTS * 20)
    sampler = SceneSampler(packed, scenes_per_step=64, samples_per_scene=16384, steps_per_epoch=2, seed=0,
                           rank=0, device=torch.device("cuda"))
    sampler.batch(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            out = sampler.batch(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scene_idx, xyz, sdf = (t.cpu() for t in out)
    check_batch(packed, scene_idx, xyz, sdf, S=16384)


def test_invalid_arguments() -> None:
    with pytest.raises(DataError, match="positive even"):
        make_sampler(samples_per_scene=7)
    with pytest.raises(DataError, match="scenes_per_step"):
        make_sampler(scenes_per_step=0)
    with pytest.raises(DataError, match="no scenes"):
        make_sampler(make_packed([]))
    with pytest.raises(DataError, match="at least one sample"):
        make_sampler(make_packed([(2, 0), (1, 1)]))


def test_shard_scene_ids() -> None:
    assert shard_scene_ids(10, 0, 3) == [0, 3, 6, 9]
    assert shard_scene_ids(10, 2, 3) == [2, 5, 8]
    shards = [shard_scene_ids(7, r, 4) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert shard_scene_ids(2, 3, 4) == []
    with pytest.raises(ValueError):
        shard_scene_ids(10, 3, 3)
